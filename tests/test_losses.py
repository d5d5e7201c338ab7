"""Objectives against their formulas written out independently (plain Python, float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mint_ray.losses import (
    dpo_loss,
    log1mexp,
    orpo_loss,
    sft_loss,
    simpo_loss,
    token_logps,
)

BETA = 0.1


def softplus(z: float) -> float:
    """log(1 + e^z) without overflow; -logsigmoid(x) == softplus(-x)."""
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def ref_orpo(c: list[float], r: list[float], nll: float, beta: float) -> float:
    """ORPO written from the paper: odds(p) = p / (1 - p) with p = exp(mean logp)."""
    terms = []
    for ci, ri in zip(c, r, strict=True):
        # log odds(p) = logp - log(1 - p); expm1 keeps 1 - p exact in float64 near p = 1.
        log_odds = (ci - math.log(-math.expm1(ci))) - (ri - math.log(-math.expm1(ri)))
        terms.append(softplus(-log_odds))
    return nll + beta * sum(terms) / len(terms)


def ref_orpo_torch64(c: torch.Tensor, r: torch.Tensor, nll: torch.Tensor, beta: float
                     ) -> torch.Tensor:
    """The same direct formula in float64 torch, for reference gradients."""
    log_odds = (c - torch.log(-torch.expm1(c))) - (r - torch.log(-torch.expm1(r)))
    return nll + beta * F.softplus(-log_odds).mean()


def naive_orpo(c: torch.Tensor, r: torch.Tensor, nll: torch.Tensor, beta: float) -> torch.Tensor:
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    return nll - beta * F.logsigmoid(log_odds).mean()


CHOSEN = [-0.3, -1.2, -1e-9, -5.0, -0.05, -40.0]
REJECTED = [-1.5, -0.4, -2.0, -1e-9, -0.06, -0.7]


def test_log1mexp_matches_float64_everywhere() -> None:
    xs = torch.tensor([-1e-30, -1e-9, -1e-4, -0.5, -math.log(2), -0.9, -5.0, -40.0, -200.0])
    got = log1mexp(xs)
    for x, g in zip(xs.tolist(), got.tolist(), strict=True):
        want = math.log(-math.expm1(x))
        assert g == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_log1mexp_at_exact_zero_is_finite_with_finite_grad() -> None:
    x = torch.tensor([0.0, -0.0, -1e-45], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_orpo_matches_formula() -> None:
    c, r = torch.tensor(CHOSEN), torch.tensor(REJECTED)
    nll = torch.tensor(1.7)
    loss, metrics = orpo_loss(c, r, nll, beta=BETA)
    # Reference on the exact fp32 inputs, in float64.
    want = ref_orpo([float(x) for x in c], [float(x) for x in r], float(nll), BETA)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["nll"].item() == pytest.approx(1.7)
    assert metrics["reward_accuracy"].item() == pytest.approx(3 / 6)
    margin = sum(BETA * (a - b) for a, b in zip(c.tolist(), r.tolist(), strict=True)) / 6
    assert metrics["reward_margin"].item() == pytest.approx(margin, rel=1e-6)
    assert all(not v.requires_grad for v in metrics.values())


def test_orpo_gradients_match_float64_reference_near_zero() -> None:
    c = torch.tensor(CHOSEN, requires_grad=True)
    r = torch.tensor(REJECTED, requires_grad=True)
    loss, _ = orpo_loss(c, r, torch.tensor(0.0), beta=BETA)
    loss.backward()
    c64 = c.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_()
    ref_orpo_torch64(c64, r64, torch.tensor(0.0, dtype=torch.float64), BETA).backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    torch.testing.assert_close(c.grad.double(), c64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r.grad.double(), r64.grad, rtol=1e-4, atol=1e-7)


def test_naive_form_breaks_where_log1mexp_does_not() -> None:
    # A confident model: mean logp -1e-9 rounds exp() to 1 in fp32.
    for c_val, r_val in ((-1e-9, -2.0), (-1e-9, -2e-9)):
        c = torch.tensor([c_val], requires_grad=True)
        r = torch.tensor([r_val], requires_grad=True)
        naive = naive_orpo(c, r, torch.tensor(0.5), BETA)
        naive.backward()
        naive_finite = bool(torch.isfinite(naive)) and bool(torch.isfinite(c.grad).all())
        assert not naive_finite
        c.grad = r.grad = None
        loss, _ = orpo_loss(c, r, torch.tensor(0.5), beta=BETA)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
        want = ref_orpo([float(c.detach())], [float(r.detach())], 0.5, BETA)
        assert loss.item() == pytest.approx(want, rel=1e-6)


def test_orpo_with_logp_exactly_zero_is_finite() -> None:
    c = torch.tensor([0.0, -0.5], requires_grad=True)
    r = torch.tensor([0.0, -1.0], requires_grad=True)
    loss, metrics = orpo_loss(c, r, torch.tensor(0.1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_token_logps_equals_log_softmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    targets = torch.randint(0, 9, (2, 4))
    want = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logps(logits, targets), want)


def test_all_masked_rows_are_excluded_without_nan() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[2] = 0  # chosen of pair 2 has no response token
    mask[5] = 0  # rejected of pair 2 too (rows 3..5 are the rejected ones)
    keep = mask[:, 1:].bool()
    counts = keep.sum(-1)
    logps = torch.where(keep, token_logps(logits[:, :-1], labels[:, 1:]), 0.0).sum(-1) / counts.clamp(min=1)
    c, r = logps[:3], logps[3:]
    valid = (counts[:3] > 0) & (counts[3:] > 0)
    assert logps[2].item() == 0.0 and counts[2].item() == 0
    nll = torch.tensor(0.3)
    loss, metrics = orpo_loss(c, r, nll, beta=BETA, valid=valid)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[2].abs().max().item() == 0.0 and logits.grad[5].abs().max().item() == 0.0
    want = ref_orpo(c[:2].tolist(), r[:2].tolist(), 0.3, BETA)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["valid_pairs"].item() == 2
    assert all(torch.isfinite(v) for v in metrics.values())


def test_no_valid_row_leaves_only_the_nll() -> None:
    c = torch.zeros(2, requires_grad=True)  # the logp of rows with no tokens
    r = torch.zeros(2, requires_grad=True)
    valid = torch.tensor([False, False])
    for loss, _ in (orpo_loss(c, r, torch.tensor(0.25), valid=valid),
                    simpo_loss(c, r, valid=valid),
                    dpo_loss(c, r, c.detach(), r.detach(), valid=valid)):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(c.grad).all()
        assert c.grad.abs().max().item() == 0.0
        c.grad = r.grad = None
    assert orpo_loss(c, r, torch.tensor(0.25), valid=valid)[0].item() == pytest.approx(0.25)


def test_dpo_matches_formula() -> None:
    pc, pr = torch.tensor([-12.0, -30.0, -8.0]), torch.tensor([-15.0, -25.0, -8.5])
    rc, rr = torch.tensor([-13.0, -29.0, -9.0]), torch.tensor([-14.0, -26.0, -8.0])
    for ls in (0.0, 0.1):
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=ls)
        terms = []
        for a, b, x, y in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
            z = BETA * ((a - b) - (x - y))
            terms.append((1 - ls) * softplus(-z) + ls * softplus(z))
        assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    chosen_rewards = [BETA * (a - x) for a, x in zip(pc.tolist(), rc.tolist(), strict=True)]
    rejected_rewards = [BETA * (b - y) for b, y in zip(pr.tolist(), rr.tolist(), strict=True)]
    acc = sum(a > b for a, b in zip(chosen_rewards, rejected_rewards, strict=True)) / 3
    assert metrics["reward_accuracy"].item() == pytest.approx(acc)
    assert metrics["rewards_chosen"].item() == pytest.approx(sum(chosen_rewards) / 3, rel=1e-6)


def test_dpo_reference_gets_no_gradient() -> None:
    pc = torch.tensor([-3.0], requires_grad=True)
    rc = torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.tensor([-4.0]), rc, torch.tensor([-4.0]))
    loss.backward()
    assert pc.grad is not None and rc.grad is None


def test_simpo_matches_formula() -> None:
    c, r = torch.tensor([-0.4, -1.0]), torch.tensor([-0.9, -0.8])
    loss, metrics = simpo_loss(c, r, beta=2.0, gamma=0.5)
    want = sum(softplus(-(2.0 * (a - b) - 0.5)) for a, b in zip(c.tolist(), r.tolist(),
                                                                strict=True)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)


def test_sft_is_the_nll() -> None:
    nll = torch.tensor(2.5, requires_grad=True)
    loss, metrics = sft_loss(nll)
    assert loss is nll and metrics["nll"].item() == 2.5 and not metrics["nll"].requires_grad
