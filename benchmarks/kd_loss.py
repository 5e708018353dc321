"""The word-level KD loss alone: naive full-tensor KL vs lionkd's chunked and fused losses.

Batch 8 x 512 positions x 32,000 vocabulary, float32, forward + backward, starting from the final
hidden states (width 256) of a student and a teacher and their output layers, as in training:
- naive:   logits = hidden @ W.T for both sides, then KL on the full [8, 512, 32000] tensors
- chunked: the same logits, then `kd_loss` (one chunk of positions at a time)
- fused:   `fused_kd_loss` on the hidden states: logits, loss and gradients one chunk at a time,
           no [8, 512, 32000] tensor at all
Each variant runs in its own subprocess; peak memory is the growth of the process's peak RSS over
its RSS once the inputs exist (ru_maxrss), time is the best of a few repetitions. Prints a table
with the ratios to naive and writes benchmarks/results/kd_loss.json.

    python benchmarks/kd_loss.py [--batch 8 --seq 512 --vocab 32000 --hidden 256 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import write_results
from lionkd.eval.speed import resident_mb

VARIANTS = ("naive", "chunked", "fused")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant: str, batch: int, seq: int, vocab: int, hidden: int, reps: int) -> dict:
    import torch

    from lionkd.kd.losses import fused_kd_loss, kd_loss

    torch.manual_seed(0)
    s_hidden = torch.randn(batch, seq, hidden, requires_grad=True)
    s_weight = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(True)
    t_hidden = torch.randn(batch, seq, hidden)
    t_weight = torch.randn(vocab, hidden) / hidden**0.5
    mask = torch.ones(batch, seq)
    base = resident_mb()

    def naive() -> torch.Tensor:
        lp_t = (t_hidden @ t_weight.T).log_softmax(-1)
        lp_s = (s_hidden @ s_weight.T).log_softmax(-1)
        kl = torch.nn.functional.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)
        return (kl * mask).sum() / mask.sum()

    def chunked() -> torch.Tensor:
        return kd_loss(s_hidden @ s_weight.T, t_hidden @ t_weight.T, mask)

    def fused() -> torch.Tensor:
        return fused_kd_loss(s_hidden, s_weight, t_hidden, t_weight, mask)

    fn = {"naive": naive, "chunked": chunked, "fused": fused}[variant]
    times, value = [], 0.0
    for _ in range(reps):
        s_hidden.grad = s_weight.grad = None
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        times.append(time.perf_counter() - start)
        value = float(loss.detach())
    return {"variant": variant, "seconds": min(times), "peak_extra_mb": peak_mb() - base, "loss": value,
            "grad_checksum": float(s_hidden.grad.double().abs().sum() + s_weight.grad.double().abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", choices=VARIANTS)
    args = parser.parse_args()
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab), "--hidden",
             str(args.hidden), "--reps", str(args.reps)]
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.vocab, args.hidden, args.reps)))
        return
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", variant, *shape], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive = rows[0]
    for r in rows:
        r["time_vs_naive"] = r["seconds"] / naive["seconds"]
        r["memory_vs_naive"] = r["peak_extra_mb"] / naive["peak_extra_mb"]
    load = os.getloadavg()
    print(f"KD loss from hidden states, forward + backward, {args.batch} x {args.seq} x {args.vocab} float32, "
          f"hidden {args.hidden}; load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'variant':<10}{'seconds':>10}{'peak extra MiB':>16}{'time/naive':>12}{'memory/naive':>14}{'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<10}{r['seconds']:>10.3f}{r['peak_extra_mb']:>16.0f}{r['time_vs_naive']:>12.2f}"
              f"{r['memory_vs_naive']:>14.2f}{r['loss']:>12.5f}")
    for r in rows[1:]:
        if abs(naive["loss"] - r["loss"]) > 1e-3 * abs(naive["loss"]):
            raise SystemExit(f"{r['variant']} and naive losses disagree")
        if abs(naive["grad_checksum"] - r["grad_checksum"]) > 1e-3 * abs(naive["grad_checksum"]):
            raise SystemExit(f"{r['variant']} and naive gradients disagree")
    write_results("kd_loss", {"shape": [args.batch, args.seq, args.vocab], "hidden": args.hidden, "rows": rows,
                              "load_average": load})


if __name__ == "__main__":
    main()
