"""Distillation losses tested as math: zero on identical inputs, direct formulas, TRL parity, chunking."""

from __future__ import annotations

import os

import pytest
import torch

from lionkd.kd.losses import (
    DIVERGENCES,
    DivergenceSpec,
    LinearHead,
    ce_loss,
    ce_term,
    fused_ce_loss,
    fused_head_loss,
    fused_kd_loss,
    kd_loss,
    kd_term,
    relation_kl_loss,
    sparse_kd_loss,
    sparse_kd_term,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def direct_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, straight from the definition."""
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_for_identical_distributions(divergence: str) -> None:
    x = logits(2, 5, 17)
    mask = torch.ones(2, 5)
    assert kd_loss(x, x.clone(), mask, spec=DivergenceSpec(divergence)).abs() < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_positive_for_different_distributions(divergence: str) -> None:
    assert kd_loss(logits(2, 5, 17), logits(2, 5, 17, seed=1), torch.ones(2, 5), spec=DivergenceSpec(divergence)) > 1e-3


def test_forward_and_reverse_kl_match_definition() -> None:
    s, t, mask = logits(3, 4, 11), logits(3, 4, 11, seed=1), torch.ones(3, 4)
    torch.testing.assert_close(kd_loss(s, t, mask, spec=DivergenceSpec("forward_kl")), direct_kl(t, s).mean())
    torch.testing.assert_close(kd_loss(s, t, mask, spec=DivergenceSpec("reverse_kl")), direct_kl(s, t).mean())
    torch.testing.assert_close(
        kd_loss(s, t, mask, spec=DivergenceSpec("tv")), 0.5 * (s.softmax(-1) - t.softmax(-1)).abs().sum(-1).mean()
    )


def test_skew_kl_matches_definition() -> None:
    s, t, mask, a = logits(2, 3, 9), logits(2, 3, 9, seed=1), torch.ones(2, 3), 0.1
    p, q = t.softmax(-1), s.softmax(-1)
    m = a * p + (1 - a) * q
    expected = (p * (p.log() - m.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, mask, spec=DivergenceSpec("skew_forward_kl", alpha=a)), expected)
    m = a * q + (1 - a) * p
    expected = (q * (q.log() - m.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, mask, spec=DivergenceSpec("skew_reverse_kl", alpha=a)), expected)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl(beta: float) -> None:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    s = logits(2, 6, 13).requires_grad_(True)
    t = logits(2, 6, 13, seed=1)
    labels = torch.randint(0, 13, (2, 6))
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    ours = kd_loss(s, t, (labels != -100).float(), chunk_size=3, spec=DivergenceSpec("jsd", temperature=2.0, beta=beta))
    # TRL applies the temperature without the T^2 factor
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=2.0) * 4.0
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g_ours, g_theirs)


def test_temperature_scales_logits_and_multiplies_by_t_squared() -> None:
    s, t, mask = logits(2, 4, 10), logits(2, 4, 10, seed=1), torch.ones(2, 4)
    torch.testing.assert_close(kd_loss(s, t, mask, spec=DivergenceSpec(temperature=3.0)), 9.0 * direct_kl(t / 3, s / 3).mean())


def test_mask_and_num_items() -> None:
    s, t = logits(2, 5, 8), logits(2, 5, 8, seed=1)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    per = direct_kl(t, s)
    torch.testing.assert_close(kd_loss(s, t, mask), (per * mask).sum() / 5)
    torch.testing.assert_close(kd_loss(s, t, mask, num_items=20), (per * mask).sum() / 20)
    # masked positions can hold anything, even inf, without affecting the loss
    s2 = s.clone()
    s2[0, 0] = float("nan")
    torch.testing.assert_close(kd_loss(s2, t, mask), kd_loss(s, t, mask))
    # example weights multiply positions
    torch.testing.assert_close(kd_loss(s, t, mask * 2, num_items=5), 2 * kd_loss(s, t, mask))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_gradients_equal_unchunked(divergence: str) -> None:
    t, mask = logits(3, 7, 19, seed=1), (torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    grads = []
    for chunk in (1, 4, 10_000):
        s = logits(3, 7, 19).requires_grad_(True)
        loss = kd_loss(s, t, mask, chunk_size=chunk, spec=DivergenceSpec(divergence, beta=0.3))
        loss.backward()
        grads.append((loss.detach(), s.grad))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0])
        torch.testing.assert_close(grad, grads[0][1])


def test_gradients_match_autograd_of_direct_formula() -> None:
    s = logits(2, 5, 12).requires_grad_(True)
    t, mask = logits(2, 5, 12, seed=1), torch.ones(2, 5)
    (g,) = torch.autograd.grad(kd_loss(s, t, mask, chunk_size=2), s)
    (g_ref,) = torch.autograd.grad(direct_kl(t, s).mean(), s)
    torch.testing.assert_close(g, g_ref)


def test_vocab_padding_is_sliced_and_mismatch_raises() -> None:
    s, t, mask = logits(2, 3, 10), logits(2, 3, 10, seed=1), torch.ones(2, 3)
    padded_s = torch.cat([s, torch.full((2, 3, 6), -30.0)], -1)  # 16 columns, 10 real tokens
    padded_t = torch.cat([t, logits(2, 3, 2, seed=4)], -1)  # 12 columns
    torch.testing.assert_close(kd_loss(padded_s, padded_t, mask, vocab_size=10), kd_loss(s, t, mask))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        kd_loss(padded_s, padded_t, mask)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        kd_loss(padded_s, padded_t, mask, vocab_size=14)


def test_cross_entropy_matches_torch() -> None:
    x, y = logits(2, 5, 9).requires_grad_(True), torch.randint(0, 9, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    ref = torch.nn.functional.cross_entropy(x.reshape(-1, 9), y.reshape(-1), reduction="none")
    ours = ce_loss(x, y, mask, chunk_size=2)
    torch.testing.assert_close(ours, (ref * mask.reshape(-1)).sum() / 7)
    (g,) = torch.autograd.grad(ours, x)
    (g_ref,) = torch.autograd.grad((ref * mask.reshape(-1)).sum() / 7, x)
    torch.testing.assert_close(g, g_ref)


def topk_of(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp = t.log_softmax(-1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals


def test_sparse_topk_with_full_k_equals_dense_forward_kl() -> None:
    s, t, mask = logits(2, 4, 8), logits(2, 4, 8, seed=1), torch.ones(2, 4)
    ids, lps = topk_of(t, 8)
    dense = kd_loss(s, t, mask)
    torch.testing.assert_close(sparse_kd_loss(s, ids, lps, mask, tail="rest"), dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sparse_kd_loss(s, ids, lps, mask, tail="renorm"), dense, atol=1e-5, rtol=1e-4)


def test_sparse_topk_tail_rules() -> None:
    s, t, mask = logits(2, 4, 30), logits(2, 4, 30, seed=1), torch.ones(2, 4)
    ids, lps = topk_of(t, 5)
    # zero when the student matches the teacher on the buckets (the rest bucket included)
    assert sparse_kd_loss(t, ids, lps, mask, tail="rest").abs() < 1e-5
    for divergence in DIVERGENCES:
        assert sparse_kd_loss(s, ids, lps, mask, tail="rest", spec=DivergenceSpec(divergence)) > 0
    # "rest" compares k + 1 buckets: top-k and the remaining mass, by hand
    p = lps.exp()
    q = s.log_softmax(-1).gather(-1, ids).exp()
    p_b = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    expected = (p_b * (p_b.log() - q_b.log())).sum(-1).mean()
    torch.testing.assert_close(sparse_kd_loss(s, ids, lps, mask, tail="rest"), expected, atol=1e-5, rtol=1e-4)
    # "renorm": teacher renormalised over its top-k, against the student's full distribution
    p_r = p / p.sum(-1, keepdim=True)
    expected = (p_r * (p_r.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(sparse_kd_loss(s, ids, lps, mask, tail="renorm"), expected)
    with pytest.raises(ValueError, match="renorm"):
        sparse_kd_loss(s, ids, lps, mask, tail="renorm", spec=DivergenceSpec("reverse_kl"))
    # chunked gradients agree
    grads = []
    for chunk in (1, 100):
        x = s.clone().requires_grad_(True)
        sparse_kd_loss(x, ids, lps, mask, chunk_size=chunk, spec=DivergenceSpec("jsd")).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_relation_kl_zero_for_same_states_and_width_free() -> None:
    x = logits(2, 6, 16)
    key_mask = torch.ones(2, 6)
    key_mask[1, 4:] = 0
    row_mask = key_mask.clone()
    assert relation_kl_loss(x, x, 4, key_mask, row_mask).abs() < 1e-6
    wide = logits(2, 6, 32, seed=3)  # a teacher of another width: relations are T x T per head
    loss = relation_kl_loss(x.requires_grad_(True), wide, 4, key_mask, row_mask, causal=True)
    assert loss > 0
    loss.backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- fused output layer + loss


def head(rows: int, width: int, seed: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = logits(rows, width, seed=seed, scale=0.5)
    return weight, (logits(rows, seed=seed + 1) if bias else None)


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return hidden @ weight.T + (bias if bias is not None else 0)


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t.requires_grad_(True) for t in tensors if t is not None]


def ragged_mask() -> torch.Tensor:
    """Prompt and padding zeros, an example weight of 2, 9 target positions (not a multiple of 4)."""
    return torch.tensor([[0, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.float)


@pytest.mark.parametrize("divergence", [*DIVERGENCES, "jsd_0", "jsd_1"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_kd_equals_logits_kd_in_value_and_gradients(divergence: str, bias: bool) -> None:
    beta = {"jsd_0": 0.0, "jsd_1": 1.0}.get(divergence, 0.3)
    divergence = "jsd" if divergence.startswith("jsd") else divergence
    vocab = 13  # the student pads its head to 16 rows, the teacher to 14
    s_hidden, t_hidden = logits(2, 7, 8, seed=3), logits(2, 7, 12, seed=4)
    s_weight, s_bias = head(16, 8, seed=5, bias=bias)
    t_weight, t_bias = head(14, 12, seed=7, bias=bias)
    mask = ragged_mask()
    options = {"spec": DivergenceSpec(divergence, temperature=2.0, beta=beta, alpha=0.2), "vocab_size": vocab}
    params = leaves(s_hidden, s_weight, s_bias)
    ref = kd_loss(project(s_hidden, s_weight, s_bias), project(t_hidden, t_weight, t_bias), mask, 20, **options)
    ref_grads = torch.autograd.grad(ref, params)
    for chunk in (1, 4, None):
        fused = fused_kd_loss(s_hidden, s_weight, t_hidden, t_weight, mask, 20, student_bias=s_bias,
                              teacher_bias=t_bias, chunk_size=chunk, **options)
        torch.testing.assert_close(fused, ref)
        grads = torch.autograd.grad(fused * 3.0, params)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, 3.0 * want)
        # padding rows of the student's head get no gradient from KD
        assert grads[1][vocab:].abs().max() == 0


def test_fused_ce_equals_logits_ce() -> None:
    hidden, (weight, bias) = logits(2, 7, 8, seed=3), head(11, 8, seed=5, bias=True)
    targets = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = ragged_mask()
    params = leaves(hidden, weight, bias)
    ref = ce_loss(project(hidden, weight, bias), targets, mask)
    fused = fused_ce_loss(hidden, weight, targets, mask, bias=bias, chunk_size=2)
    torch.testing.assert_close(fused, ref)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(got, want)


def test_fused_terms_share_one_pass_and_report_parts() -> None:
    """CE + dense KD (teacher as logits) + sparse top-k KD in one pass equal the weighted logits losses."""
    hidden, (weight, _) = logits(2, 7, 8, seed=3), head(10, 8, seed=5, bias=False)
    t_logits = logits(2, 7, 10, seed=9)
    targets = torch.randint(0, 10, (2, 7), generator=torch.Generator().manual_seed(0))
    ids, lps = topk_of(t_logits / 1.5, 3)
    mask = ragged_mask()
    params = leaves(hidden, weight)
    s_logits = project(hidden, weight, None)
    refs = {
        "ce": ce_loss(s_logits, targets, mask, 12),
        "kd": kd_loss(s_logits, t_logits, mask, 12, spec=DivergenceSpec("reverse_kl", temperature=1.5)),
        "topk": sparse_kd_loss(s_logits, ids, lps, mask, 12, spec=DivergenceSpec("jsd", temperature=1.5)),
    }
    weights = {"ce": 0.3, "kd": 1.0, "topk": 0.5}
    terms = {
        "ce": (0.3, ce_term(targets)),
        "kd": (1.0, kd_term(t_logits, spec=DivergenceSpec("reverse_kl", temperature=1.5))),
        "topk": (0.5, sparse_kd_term(ids, lps, spec=DivergenceSpec("jsd", temperature=1.5))),
    }
    total, parts = fused_head_loss(LinearHead(hidden, weight), mask, 12, terms=terms, chunk_size=4)
    ref_total = sum(weights[k] * v for k, v in refs.items())
    torch.testing.assert_close(total, ref_total)
    for name, value in parts.items():
        torch.testing.assert_close(value, refs[name].detach())
        assert not value.requires_grad
    for got, want in zip(torch.autograd.grad(total, params), torch.autograd.grad(ref_total, params), strict=True):
        torch.testing.assert_close(got, want)


def test_fused_ce_with_its_own_rows_equals_masked_ce() -> None:
    """Joint-Teaching: CE on some rows only, normalised by their own count, inside a pass over all rows."""
    hidden, (weight, _) = logits(2, 7, 8, seed=3), head(10, 8, seed=5, bias=False)
    targets = torch.randint(0, 10, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = ragged_mask()
    ce_mask = mask.clone()
    ce_mask[1] = 0  # row 1 is the student's own sample
    n, ce_n = mask.ne(0).sum(), ce_mask.ne(0).sum()
    params = leaves(hidden, weight)
    ref = ce_loss(project(hidden, weight, None), targets, ce_mask, ce_n)
    total, _ = fused_head_loss(LinearHead(hidden, weight), mask, n,
                               terms={"ce": (1.0, ce_term(targets, ce_mask.ne(0).float() * (n / ce_n)))}, chunk_size=3)
    torch.testing.assert_close(total, ref)
    for got, want in zip(torch.autograd.grad(total, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(got, want)


def test_fused_kd_edge_cases() -> None:
    hidden, (weight, _) = logits(2, 7, 8, seed=3), head(10, 8, seed=5, bias=False)
    t_hidden, (t_weight, _) = logits(2, 7, 8, seed=4), head(10, 8, seed=6, bias=False)
    # identical sides give zero; masked positions may hold nan and are never projected
    mask = ragged_mask()
    poisoned = hidden.clone()
    poisoned[0, 0] = float("nan")
    assert fused_kd_loss(poisoned, weight, poisoned, weight, mask).abs() < 1e-6
    # tokens the teacher rules out (-inf logits) give finite values, equal to the logits path
    t_bias = torch.zeros(10)
    t_bias[3] = float("-inf")
    for divergence in ("forward_kl", "jsd", "tv"):  # (reverse KL is infinite there, as it should be)
        ref = kd_loss(project(hidden, weight, None), project(t_hidden, t_weight, t_bias), mask, spec=DivergenceSpec(divergence))
        fused = fused_kd_loss(hidden, weight, t_hidden, t_weight, mask, teacher_bias=t_bias, spec=DivergenceSpec(divergence))
        assert torch.isfinite(fused)
        torch.testing.assert_close(fused, ref)
    # an empty mask gives zero and zero gradients
    h = hidden.clone().requires_grad_(True)
    empty = fused_kd_loss(h, weight, t_hidden, t_weight, torch.zeros(2, 7))
    empty.backward()
    assert empty == 0 and h.grad.abs().max() == 0
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fused_kd_loss(hidden, weight, t_hidden, t_weight[:9], mask)
