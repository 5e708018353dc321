"""Distillation losses as plain functions of logits.

Conventions shared by every loss here:
- `student_logits` is [B, T, V]; position t is scored against whatever the caller aligned with it
  (the collator shifts targets for causal models, so no logits tensor is ever sliced or copied).
- `mask` is [B, T]: the weight of each position (0 for prompt and padding, 1 or an example weight
  for target tokens).
- The result is the weighted SUM over positions divided by `num_items`, the number of target tokens
  of the whole optimiser step (all micro-batches, all processes). Loss and gradients are then the
  same however the step is split. With `num_items=None` the local token count is used.
- Divergences sum over the vocabulary. With a temperature both sides are divided by it and the loss
  is multiplied by its square (the gradient scale stays comparable across temperatures).

Memory: full-vocabulary probabilities exist for one chunk of positions at a time. `_ChunkedRowLoss`
evaluates the per-position loss chunk by chunk without autograd, and in backward recomputes each
chunk with autograd to get its gradient, so the [N, V] float32 intermediates of a naive
implementation never exist at once.

The fused losses at the end (`fused_kd_loss`, `fused_ce_loss`, `fused_head_loss`) go further: they
take the final hidden states and the linear output layer instead of logits, so not even the
[N, V] logits of student or teacher exist; the trainer uses them whenever a model allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from ..config import KDConfig

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]
TopkTail = Literal["rest", "renorm"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")

CHUNK_ELEMENTS = 1 << 23  # ~32 MiB of float32 per [chunk, V] intermediate


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence word-level KD takes, and its settings; one for every KD loss and term here.

    `beta` is GKD's JSD weight (`jsd` only), `alpha` DistiLLM's skew (`skew_*` only); `temperature`
    divides both sides' logits, and the loss is multiplied by its square.
    """

    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")

    @classmethod
    def from_config(cls, kd: KDConfig) -> DivergenceSpec:
        return cls(kd.divergence, temperature=kd.temperature, beta=kd.jsd_beta, alpha=kd.skew_alpha)

    def rows(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        """Per-row divergence of log-probability rows [N, V] -> [N], already at the temperature."""
        return divergence_rows(student_logp, teacher_logp, self.divergence, beta=self.beta, alpha=self.alpha)


FORWARD_KL = DivergenceSpec()


# --------------------------------------------------------------------------- divergences on rows


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; terms where p = 0 count as 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b)."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence_rows(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    divergence: Divergence = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence between teacher p and student q, given log-probabilities [N, V] -> [N].

    - forward_kl: KL(p || q)                     reverse_kl: KL(q || p)
    - jsd: the generalised JSD of GKD with TRL's semantics: beta = 0 is KL(p || q), beta = 1 is
      KL(q || p), otherwise beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q.
    - skew_forward_kl: KL(p || alpha p + (1 - alpha) q)   (DistiLLM)
    - skew_reverse_kl: KL(q || alpha q + (1 - alpha) p)   (DistiLLM)
    - tv: total variation, 0.5 * sum |p - q|
    """
    # Clamping keeps exp(-inf) * (-inf - x) from turning into nan for tokens a model rules out.
    tiny = torch.finfo(student_logp.dtype).min
    lq, lp = student_logp.clamp_min(tiny), teacher_logp.clamp_min(tiny)
    if divergence == "forward_kl":
        return _kl(lp, lq)
    if divergence == "reverse_kl":
        return _kl(lq, lp)
    if divergence == "jsd":
        if beta == 0.0:
            return _kl(lp, lq)
        if beta == 1.0:
            return _kl(lq, lp)
        lm = _log_mix(lp, lq, beta)
        return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    if divergence == "skew_forward_kl":
        return _kl(lp, _log_mix(lp, lq, alpha))
    if divergence == "skew_reverse_kl":
        return _kl(lq, _log_mix(lq, lp, alpha))
    if divergence == "tv":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


# --------------------------------------------------------------------------- chunked evaluation

RowLoss = Callable[..., torch.Tensor]  # (student_rows [C, V], *other_rows) -> per-row loss [C]


class _ChunkedRowLoss(torch.autograd.Function):
    """sum_i w_i * row_loss(student[i], others[i]) over rows with w_i != 0, chunk by chunk."""

    @staticmethod
    def forward(ctx, student, weights, row_loss, chunk, *others):  # type: ignore[override]
        rows = weights.nonzero().squeeze(-1)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            loss = row_loss(student.index_select(0, idx), *(o.index_select(0, idx) for o in others))
            total += (loss * weights.index_select(0, idx)).sum()
        ctx.save_for_backward(student, weights, rows, *others)
        ctx.row_loss, ctx.chunk = row_loss, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        student, weights, rows, *others = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for start in range(0, rows.numel(), ctx.chunk):
            idx = rows[start : start + ctx.chunk]
            with torch.enable_grad():
                part = student.index_select(0, idx).detach().requires_grad_(True)
                loss = ctx.row_loss(part, *(o.index_select(0, idx) for o in others))
                (g,) = torch.autograd.grad((loss * weights.index_select(0, idx)).sum(), part)
            grad.index_copy_(0, idx, g * grad_total)
        return grad, None, None, None, *([None] * len(others))


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 3 else x.reshape(-1)


def _normalise(total: torch.Tensor, mask: torch.Tensor, num_items: float | torch.Tensor | None) -> torch.Tensor:
    if num_items is None:
        num_items = (mask != 0).sum().clamp_min(1)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device, total.dtype)
    return total / num_items


def common_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None = None) -> int:
    """The number of logit columns both sides share.

    Models pad their output layer (151936 vs 152064 rows for one tokenizer), so sizes may differ
    while the tokens are the same. `vocab_size` is the real vocabulary (len(tokenizer)); columns
    beyond it are padding and dropped. Without it, sizes must be equal.
    """
    if vocab_size is not None:
        if min(student_vocab, teacher_vocab) < vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the tokenizer has {vocab_size} tokens but the student scores "
                f"{student_vocab} and the teacher {teacher_vocab}"
            )
        return vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"vocabulary mismatch: student logits have {student_vocab} columns, teacher logits "
            f"{teacher_vocab}; if the extra columns are padding, pass vocab_size=len(tokenizer)"
        )
    return student_vocab


# --------------------------------------------------------------------------- public losses


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    spec: DivergenceSpec = FORWARD_KL,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Word-level KD against the teacher's full distribution (see the module doc for conventions)."""
    vocab = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)

    def row_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _dense_rows(s, t, vocab, spec)

    total = _ChunkedRowLoss.apply(
        _flat(student_logits), _flat(mask).float(), row_loss, _chunk_rows(vocab, chunk_size),
        _flat(teacher_logits).detach(),
    )
    return _normalise(total * spec.temperature**2, mask, num_items)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    spec: DivergenceSpec = FORWARD_KL,
    tail: TopkTail = "rest",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Word-level KD against the teacher's top-k only: ids and log-probabilities [B, T, k].

    The teacher's log-probabilities must already be at the training temperature (cache them that
    way); the student's logits are divided by `spec.temperature` here. The mass the teacher puts outside
    its top-k is handled explicitly by `tail`:
    - "rest" (default): compare k + 1 buckets, the top-k tokens and one "rest" bucket holding the
      remaining mass (1 - sum of the teacher's top-k probabilities against the student's mass on all
      other tokens). Exact when the teacher's tail is empty; any divergence applies.
    - "renorm": renormalise the teacher over its top-k (its tail counts as zero) and take
      KL(teacher || student) against the student's full distribution. Forward KL only.
    """
    _check_topk(teacher_ids, student_logits.shape[-1], spec.divergence, tail)

    def row_loss(s: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        return _sparse_rows(s, ids, t_logp, spec, tail)

    total = _ChunkedRowLoss.apply(
        _flat(student_logits), _flat(mask).float(), row_loss, _chunk_rows(student_logits.shape[-1], chunk_size),
        _flat(teacher_ids), _flat(teacher_logprobs).detach(),
    )
    return _normalise(total * spec.temperature**2, mask, num_items)


def _dense_rows(s: torch.Tensor, t: torch.Tensor, vocab: int, spec: DivergenceSpec) -> torch.Tensor:
    """Per-row divergence of student and teacher logits rows over their first `vocab` columns."""
    s = s[:, :vocab].float() / spec.temperature
    t = t[:, :vocab].float() / spec.temperature
    return spec.rows(s.log_softmax(-1), t.log_softmax(-1))


def _check_topk(teacher_ids: torch.Tensor, student_vocab: int, divergence: Divergence, tail: TopkTail) -> None:
    if tail == "renorm" and divergence != "forward_kl":
        raise ValueError("sparse top-k with tail='renorm' supports divergence='forward_kl' only")
    if tail not in ("rest", "renorm"):
        raise ValueError(f"unknown top-k tail rule {tail!r}; choose 'rest' or 'renorm'")
    if teacher_ids.numel() and teacher_ids.max() >= student_vocab:
        raise ValueError("teacher top-k ids exceed the student's vocabulary")


def _sparse_rows(
    s: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    spec: DivergenceSpec,
    tail: TopkTail,
) -> torch.Tensor:
    """Per-row divergence of student logits rows against the teacher's top-k (see `sparse_kd_loss`)."""
    s_logp = (s.float() / spec.temperature).log_softmax(-1)
    s_top = s_logp.gather(-1, ids.long())
    t_logp = t_logp.float()
    if tail == "renorm":
        t_logp = t_logp - t_logp.logsumexp(-1, keepdim=True)
        return (t_logp.exp() * (t_logp - s_top)).sum(-1)
    s_rest = _log1mexp(s_top.logsumexp(-1, keepdim=True))
    t_rest = _log1mexp(t_logp.logsumexp(-1, keepdim=True))
    return spec.rows(torch.cat([s_top, s_rest], -1), torch.cat([t_logp, t_rest], -1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; -inf-ish when the mass is all used up."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def ce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the targets [B, T] aligned with the logits, weighted by `mask`."""

    def row_loss(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = s.float()
        return s.logsumexp(-1) - s.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    total = _ChunkedRowLoss.apply(
        _flat(logits), _flat(mask).float(), row_loss, _chunk_rows(logits.shape[-1], chunk_size), _flat(targets)
    )
    return _normalise(total, mask, num_items)


def relation_kl_loss(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    num_heads: int,
    key_mask: torch.Tensor,
    row_mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """MiniLM self-relation KD for one of Q, K or V: states [B, T, H] of either width.

    Both sides are split into `num_heads` relation heads (the teacher's head count), relations are
    softmax(X X^T / sqrt(d)) per head, and the loss is KL(teacher || student) per query row,
    averaged over heads, weighted by `row_mask` [B, T] and divided by `num_items`.
    """

    def log_relations(x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        if h % num_heads:
            raise ValueError(f"hidden size {h} is not divisible by {num_heads} relation heads")
        x = x.float().view(b, t, num_heads, h // num_heads).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(h // num_heads)
        allowed = key_mask[:, None, None, :].bool()
        if causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).log_softmax(-1)

    lq, lp = log_relations(student_states), log_relations(teacher_states.detach())
    per_row = (lp.exp() * (lp - lq)).sum(-1).mean(1)  # [B, T]
    total = (per_row * row_mask.float()).sum()
    return _normalise(total, row_mask, num_items)


# --------------------------------------------------------------------------- fused output layer + loss
#
# The logits of a language model are `hidden @ W.T (+ b)` with W [V, H]. At a 32K-150K vocabulary the
# [positions, V] logits (and their gradient, and every float32 intermediate of a loss on them) dwarf
# everything else a training step holds. The fused losses below take the hidden states instead, and
# for one chunk of target positions at a time compute the logits, the loss and its gradient with
# respect to those logits, and fold that gradient straight into grad(hidden) = g @ W and
# grad(W) = g.T @ hidden. Only those two gradients (the size of the inputs) outlive the chunk; the
# backward pass just scales them. Positions with a zero mask are never projected at all.

FUSED_CHUNK_ELEMENTS = 1 << 23  # ~32 MiB of float32 per [chunk, V] intermediate (256 rows at 32K)

# (student logits [C, V] float32, flat positions [C]) -> (loss per row [C], its gradient [C, V' <= V])
HeadTerm = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LinearHead:
    """Hidden states [..., H] and the linear output layer (weight [V, H], bias [V]) that scores them."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def logits(self, positions: torch.Tensor) -> torch.Tensor:
        """Float32 logits [C, V] of the flattened positions."""
        flat = self.hidden.reshape(-1, self.hidden.shape[-1])
        return _project(flat.index_select(0, positions), self.weight, self.bias)


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    z = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z.float()


class _FusedHeadLoss(torch.autograd.Function):
    """The sum over row chunks of `evaluate(logits of the chunk)`; gradients are built in forward.

    `evaluate(z, start, end)` returns (total, parts, grad_z) for rows start:end: the weighted loss,
    its unweighted parts (for logging) and d total / d z.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, evaluate, chunk, parts_if_empty):  # type: ignore[override]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        # float32 accumulators: a low-precision weight still sums its gradient over all chunks exactly
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total, parts = torch.zeros((), dtype=torch.float32, device=hidden.device), parts_if_empty
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            loss, part, g = evaluate(_project(h, weight, bias), start, start + h.shape[0])
            total += loss
            parts = parts + part
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h[start : start + h.shape[0]] = g @ weight
            if grad_w is not None and weight.dtype == torch.float32:
                grad_w.addmm_(g.T, h.to(weight.dtype))
            elif grad_w is not None:
                grad_w += g.T @ h.to(weight.dtype)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, _grad_parts):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = grad_h * grad_total if grad_h is not None else None
        grad_w = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        grad_b = (grad_b * grad_total).to(b_dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def fused_head_loss(
    student: LinearHead,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    terms: Mapping[str, tuple[float, HeadTerm]],
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_k weight_k * loss_k over `terms` ({name: (weight, term)}), each loss equal to its logits twin.

    `mask` has the leading shape of `student.hidden` [..., H]; every loss is the mask-weighted sum over
    positions divided by `num_items`, as in the rest of this module. Returns the weighted total
    (differentiable w.r.t. the hidden states, weight and bias) and each loss alone (detached). The
    student's logits are computed once per chunk and shared by all terms.
    """
    device = student.hidden.device
    flat_mask = mask.reshape(-1).to(device)
    positions = flat_mask.nonzero().squeeze(-1)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1]).index_select(0, positions)
    row_weights = flat_mask.index_select(0, positions).float()
    if num_items is None:
        num_items = max(positions.numel(), 1)
    inv_items = 1.0 / torch.as_tensor(num_items, dtype=torch.float32, device=device)
    names = list(terms)
    term_weights = torch.tensor([terms[k][0] for k in names], dtype=torch.float32, device=device)

    def evaluate(z: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos, w = positions[start:end], row_weights[start:end]
        sums, grad = [], None
        for name, term_weight in zip(names, term_weights, strict=True):
            loss, g = terms[name][1](z, pos)
            sums.append((loss * w).sum())
            scale = (w * (term_weight * inv_items)).unsqueeze(-1)
            if grad is None and g.shape[-1] == z.shape[-1]:
                grad = g.mul_(scale)  # terms hand over fresh tensors
            else:
                grad = torch.zeros_like(z) if grad is None else grad
                grad[:, : g.shape[-1]].addcmul_(g, scale)
        part = torch.stack(sums) * inv_items if sums else term_weights
        return (part * term_weights).sum(), part, torch.zeros_like(z) if grad is None else grad

    chunk = chunk_size or max(1, FUSED_CHUNK_ELEMENTS // max(student.vocab, 1))
    total, parts = _FusedHeadLoss.apply(
        hidden, student.weight, student.bias, evaluate, chunk, torch.zeros(len(names), device=device)
    )
    return total, {name: parts[i] for i, name in enumerate(names)}


# Terms. Forward and reverse KL and cross-entropy have closed-form gradients; the other divergences
# and the sparse top-k losses differentiate the logits-path row loss with autograd, one chunk at a time.


def _with_autograd(row_loss: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        loss = row_loss(leaf)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)  # rows are independent: per-row gradients
    return loss.detach(), grad


def ce_term(targets: torch.Tensor, row_scale: torch.Tensor | None = None) -> HeadTerm:
    """Cross-entropy of `targets` (the shape of the mask), as `ce_loss`; `row_scale` (the same shape)
    rescales or drops positions for this term alone (Joint-Teaching: no CE on the student's samples)."""
    flat_targets = targets.reshape(-1)
    flat_scale = row_scale.reshape(-1) if row_scale is not None else None

    def term(z: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = flat_targets.index_select(0, pos.to(flat_targets.device)).to(z.device).long().unsqueeze(-1)
        lse = z.logsumexp(-1, keepdim=True)
        loss = (lse - z.gather(-1, y)).squeeze(-1)
        grad = (z - lse).exp_()  # softmax - one_hot(y)
        grad.scatter_add_(-1, y, torch.full_like(lse, -1.0))
        if flat_scale is not None:
            scale = flat_scale.index_select(0, pos.to(flat_scale.device)).to(z.device, z.dtype)
            loss, grad = loss * scale, grad.mul_(scale.unsqueeze(-1))
        return loss, grad

    return term


def kd_term(
    teacher: LinearHead | torch.Tensor,
    *,
    spec: DivergenceSpec = FORWARD_KL,
    vocab_size: int | None = None,
) -> HeadTerm:
    """Word-level KD as `kd_loss`; the teacher is its own hidden states and head, or its logits [..., V]."""
    if spec.divergence == "jsd" and spec.beta in (0.0, 1.0):  # GKD's end points are plain KLs
        spec = replace(spec, divergence="forward_kl" if spec.beta == 0.0 else "reverse_kl")
    if isinstance(teacher, LinearHead):
        teacher_vocab, teacher_logits = teacher.vocab, teacher.logits
    else:
        flat = teacher.reshape(-1, teacher.shape[-1])
        teacher_vocab = flat.shape[-1]

        def teacher_logits(pos: torch.Tensor) -> torch.Tensor:
            return flat.index_select(0, pos.to(flat.device)).float()

    def term(z: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = common_vocab(z.shape[-1], teacher_vocab, vocab_size)
        with torch.no_grad():
            t = teacher_logits(pos)[:, :vocab].to(z.device)
        if spec.divergence in ("forward_kl", "reverse_kl"):
            return _analytic_kl(z[:, :vocab], t, spec.temperature, reverse=spec.divergence == "reverse_kl")
        loss, grad = _with_autograd(lambda s: _dense_rows(s, t, vocab, spec), z[:, :vocab])
        return loss * spec.temperature**2, grad.mul_(spec.temperature**2)

    return term


def _analytic_kl(
    s: torch.Tensor, t: torch.Tensor, temperature: float, *, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """T^2 KL(p || q) (or KL(q || p)) per row of student logits s and teacher logits t, and d/ds.

    Works in place on fresh [C, V] buffers: four of them live at most.
    """
    tiny = torch.finfo(torch.float32).min  # as `divergence_rows`: ruled-out tokens give 0, not nan
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    lq = s.log_softmax(-1).clamp_min_(tiny)
    del s
    lp = t.log_softmax(-1).clamp_min_(tiny)
    del t
    if not reverse:  # KL(p || q) = sum p (lp - lq);  d/ds = q - p
        p = lp.exp()
        diff = lp.sub_(lq)
        grad = lq.exp_().sub_(p)
        loss = p.mul_(diff).sum(-1)
    else:  # KL(q || p) = sum q (lq - lp);  d/ds = q (lq - lp - KL)
        q = lq.exp()
        diff = lq.sub_(lp)
        loss = (q * diff).sum(-1)
        grad = diff.sub_(loss.unsqueeze(-1)).mul_(q)
    # the loss is scaled by T^2 and d/dz = d/ds / T
    return loss * temperature**2, grad.mul_(temperature)


def sparse_kd_term(
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    spec: DivergenceSpec = FORWARD_KL,
    tail: TopkTail = "rest",
) -> HeadTerm:
    """Word-level KD against cached teacher top-k ids and log-probabilities [..., k], as `sparse_kd_loss`."""
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])
    logprobs = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])

    def term(z: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_topk(ids, z.shape[-1], spec.divergence, tail)
        i = ids.index_select(0, pos.to(ids.device)).to(z.device)
        lp = logprobs.index_select(0, pos.to(logprobs.device)).to(z.device)
        loss, grad = _with_autograd(lambda s: _sparse_rows(s, i, lp, spec, tail), z)
        return loss * spec.temperature**2, grad.mul_(spec.temperature**2)

    return term


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    spec: DivergenceSpec = FORWARD_KL,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`kd_loss` of the logits `hidden @ weight.T + bias` of both sides, without building them."""
    teacher = LinearHead(teacher_hidden.detach(), teacher_weight.detach(),
                         teacher_bias.detach() if teacher_bias is not None else None)
    term = kd_term(teacher, spec=spec, vocab_size=vocab_size)
    student = LinearHead(student_hidden, student_weight, student_bias)
    total, _ = fused_head_loss(student, mask, num_items, terms={"kd": (1.0, term)}, chunk_size=chunk_size)
    return total


def fused_ce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`ce_loss` of the logits `hidden @ weight.T + bias`, without building them."""
    student = LinearHead(hidden, weight, bias)
    total, _ = fused_head_loss(student, mask, num_items, terms={"ce": (1.0, ce_term(targets))}, chunk_size=chunk_size)
    return total


# --------------------------------------------------------------------------- on-policy reverse KL
#
# The student's own samples, scored by the teacher (GKD, MiniLLM, on-policy distillation): at each
# position t of a sample, the student q and the teacher p are compared by the reverse KL(q || p).
# Two estimates, from what a served teacher returns for the sample:
# - "k1": the sampled token y only. Its value is log q(y) - log p(y), whose mean over the student's
#   samples estimates KL(q || p); its gradient is the score-function one, (log q(y) - log p(y)) *
#   grad log q(y), the gradient of the sequence-level reverse KL with a per-token reward (no baseline).
# - "topk": the teacher's top-k at t and a tail bucket (the rest of the mass on either side); the
#   reverse KL over these k + 1 buckets is exact for the position, with its exact gradient. Slots of
#   a row that hold no token (id < 0) belong to the tail.
# Both take the student's logits (or the fused head) at the sample's positions and a mask of the
# positions that have a teacher counterpart; sums are divided by `num_items` as everywhere here.

OnPolicyEstimator = Literal["k1", "topk"]


def _k1_rows(s: torch.Tensor, y: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Per row: log q(y) - log p(y) as value, (log q(y) - log p(y)) * grad log q(y) as gradient."""
    lq = s.float().log_softmax(-1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    advantage = (lq - t_logp.float()).detach()
    return advantage + (lq - lq.detach()) * advantage


def _topk_reverse_rows(s: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Per row: KL(q || p) over the teacher's top-k tokens and one tail bucket."""
    s_logp = s.float().log_softmax(-1)
    valid = ids >= 0
    s_top = s_logp.gather(-1, ids.clamp_min(0).long()).masked_fill(~valid, -math.inf)
    t_top = t_logp.float().masked_fill(~valid, -math.inf)
    s_rest = _log1mexp(s_top.logsumexp(-1, keepdim=True))
    t_rest = _log1mexp(t_top.logsumexp(-1, keepdim=True))
    return divergence_rows(torch.cat([s_top, s_rest], -1), torch.cat([t_top, t_rest], -1), "reverse_kl")


def on_policy_loss(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    num_items: float | torch.Tensor | None = None,
    *,
    estimator: OnPolicyEstimator = "topk",
    token_ids: torch.Tensor | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reverse KL on the student's samples: "k1" takes the sampled `token_ids` [B, T] and the teacher's
    log-probability of each [B, T]; "topk" the teacher's top-k ids and log-probabilities [B, T, k]."""
    chunk = _chunk_rows(student_logits.shape[-1], chunk_size)
    if estimator == "k1":
        assert token_ids is not None and teacher_token_logprobs is not None
        total = _ChunkedRowLoss.apply(_flat(student_logits), _flat(mask).float(), _k1_rows, chunk,
                                      _flat(token_ids), _flat(teacher_token_logprobs).detach())
    elif estimator == "topk":
        assert teacher_ids is not None and teacher_logprobs is not None
        total = _ChunkedRowLoss.apply(_flat(student_logits), _flat(mask).float(), _topk_reverse_rows, chunk,
                                      _flat(teacher_ids), _flat(teacher_logprobs).detach())
    else:
        raise ValueError(f"unknown on-policy estimator {estimator!r}; choose 'k1' or 'topk'")
    return _normalise(total, mask, num_items)


def on_policy_k1_term(token_ids: torch.Tensor, teacher_token_logprobs: torch.Tensor) -> HeadTerm:
    """`on_policy_loss(estimator="k1")` as a fused-head term (closed-form gradient)."""
    flat_y = token_ids.reshape(-1)
    flat_lp = teacher_token_logprobs.reshape(-1)

    def term(z: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = flat_y.index_select(0, pos.to(flat_y.device)).to(z.device).long().unsqueeze(-1)
        lp = flat_lp.index_select(0, pos.to(flat_lp.device)).to(z.device, torch.float32)
        lq_all = z.log_softmax(-1)
        advantage = lq_all.gather(-1, y).squeeze(-1) - lp
        grad = lq_all.exp_().neg_()  # d log q(y) / dz = one_hot(y) - softmax(z)
        grad.scatter_add_(-1, y, torch.ones_like(y, dtype=grad.dtype))
        return advantage, grad.mul_(advantage.unsqueeze(-1))

    return term


def on_policy_topk_term(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> HeadTerm:
    """`on_policy_loss(estimator="topk")` as a fused-head term."""
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])
    logprobs = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])

    def term(z: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = ids.index_select(0, pos.to(ids.device)).to(z.device)
        lp = logprobs.index_select(0, pos.to(logprobs.device)).to(z.device)
        return _with_autograd(lambda s: _topk_reverse_rows(s, i, lp), z)

    return term
