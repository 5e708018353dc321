"""The word-level KD loss alone: lionkd's chunked forward KL vs a naive full-tensor KL.

Batch 8 x 512 positions x 32,000 vocabulary, float32, forward + backward. Each variant runs in its
own subprocess; peak memory is the growth of the process's peak RSS over its RSS once the inputs
exist (ru_maxrss), time is the best of a few repetitions. Prints a table and writes
benchmarks/results/kd_loss.json.

    python benchmarks/kd_loss.py [--batch 8 --seq 512 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "kd_loss.json"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant: str, batch: int, seq: int, vocab: int, reps: int) -> dict:
    import torch

    from lionkd.kd.losses import kd_loss

    torch.manual_seed(0)
    student = torch.randn(batch, seq, vocab, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab)
    mask = torch.ones(batch, seq)
    base = rss_mb()

    def naive() -> torch.Tensor:
        lp_t = teacher.log_softmax(-1)
        lp_s = student.log_softmax(-1)
        kl = torch.nn.functional.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)
        return (kl * mask).sum() / mask.sum()

    def chunked() -> torch.Tensor:
        return kd_loss(student, teacher, mask)

    fn = naive if variant == "naive" else chunked
    times, value = [], 0.0
    for _ in range(reps):
        student.grad = None
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        times.append(time.perf_counter() - start)
        value = float(loss)
    return {"variant": variant, "seconds": min(times), "peak_extra_mb": peak_mb() - base, "loss": value,
            "grad_checksum": float(student.grad.double().abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", choices=["naive", "lionkd"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.vocab, args.reps)))
        return
    rows = []
    for variant in ("naive", "lionkd"):
        cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch), "--seq", str(args.seq),
               "--vocab", str(args.vocab), "--reps", str(args.reps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive, ours = rows
    ratio = {"time": ours["seconds"] / naive["seconds"], "memory": ours["peak_extra_mb"] / naive["peak_extra_mb"]}
    print(f"KD loss, forward + backward, {args.batch} x {args.seq} x {args.vocab} float32")
    print(f"{'variant':<10}{'seconds':>10}{'peak extra MiB':>16}{'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<10}{r['seconds']:>10.3f}{r['peak_extra_mb']:>16.0f}{r['loss']:>12.5f}")
    print(f"lionkd / naive: time x{ratio['time']:.2f}, peak memory x{ratio['memory']:.2f}")
    if abs(naive["loss"] - ours["loss"]) > 1e-3 * abs(naive["loss"]):
        raise SystemExit("the two losses disagree")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"shape": [args.batch, args.seq, args.vocab], "rows": rows, "ratio": ratio},
                                  indent=2))


if __name__ == "__main__":
    main()
