"""Objectives as pure functions on per-sequence log-probabilities.

Everything here is plain torch on tensors: no model, no Ray, no DeepSpeed. The
trainer computes per-sequence log-probabilities (``mint_ray.training.logprobs``)
and calls one of the objectives:

- ``orpo_loss``: NLL(chosen) + beta * mean(-logsigmoid(log odds ratio)), TRL's form,
  with ``log1mexp`` so that a confident model (mean logp -> 0) stays finite.
- ``dpo_loss``: sigmoid DPO against a frozen reference model's log-probabilities.
- ``simpo_loss``: reference-free, length-normalised margin loss.
- ``sft_loss``: the NLL of the chosen answer alone.

Each returns ``(loss, metrics)``: a scalar loss with its graph, and a dict of
detached 0-d tensors (all-reducible across ranks before ``.item()``).

Rows without response tokens (a pad row that keeps ranks in lockstep, or a
response truncated away) have no log-probability: pass ``valid`` (False for
those rows) and they get zero weight in the loss and in the metrics. Their
inputs are replaced before any ``log``, so they cannot put NaN into the
gradient either (a NaN branch behind ``torch.where`` still poisons backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LN2 = math.log(2.0)

Metrics = dict[str, Tensor]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Mächler 2012).

    ``log1p(-exp(x))`` loses everything as ``x -> 0`` (``exp`` rounds to 1), and
    ``log(-expm1(x))`` loses precision for very negative ``x``; each branch is
    used where it is exact. ``x`` is clamped just below 0, so a mean logp that
    rounded to exactly 0 in fp32 gives a large finite value, not ``-inf``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    far = x < -_LN2
    # Each branch sees only inputs it is finite on: torch.where passes a zero
    # gradient to the unused branch, and 0 * inf would still be NaN.
    safe = torch.full_like(x, -1.0)
    return torch.where(far, torch.log1p(-torch.exp(torch.where(far, x, safe))),
                       torch.log(-torch.expm1(torch.where(far, safe, x))))


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """fp32 ``log_softmax(logits)[..., target]``: ``[..., V]`` and ``[...]`` -> ``[...]``.

    Computed as ``logit[target] - logsumexp(logits)`` so no second ``[..., V]``
    tensor of log-probabilities is kept for backward. ``targets`` must be token
    ids (masking is done by the caller's mask, not with -100 labels). Ids
    outside the head's range (negative pads, Mllama's ``<|image|>`` token, which
    the LM head never predicts) are clamped so they index safely; the caller's
    mask never selects them.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _weights(like: Tensor, valid: Tensor | None) -> Tensor:
    """1.0 for rows that count, 0.0 for the others."""
    if valid is None:
        return torch.ones_like(like)
    return valid.to(device=like.device, dtype=like.dtype)


def _sanitize(x: Tensor, w: Tensor) -> Tensor:
    """``x`` with excluded rows set to a harmless finite logp (-1, inside log1mexp's domain)."""
    return torch.where(w > 0, x, torch.full_like(x, -1.0))


def _mean(x: Tensor, w: Tensor) -> Tensor:
    """Mean of ``x`` over rows with weight 1; 0 (with a graph) when none count."""
    return (x * w).sum() / w.sum().clamp(min=1.0)


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, w: Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards_chosen": _mean(chosen_rewards, w),
        "rewards_rejected": _mean(rejected_rewards, w),
        "reward_accuracy": _mean((chosen_rewards > rejected_rewards).to(w.dtype), w),
        "reward_margin": _mean(chosen_rewards - rejected_rewards, w),
        "valid_pairs": w.sum(),
    }


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor,
              beta: float = 0.1, valid: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """ORPO (Hong et al. 2024) in TRL's form.

    ``chosen_logps``/``rejected_logps`` ``[B]`` are MEAN log-probabilities over the
    response tokens (fp32); ``chosen_nll`` is the scalar NLL term (over the whole
    chosen sequence or its response, see ``training.logprobs``). With
    ``log_odds = (c - r) - (log1mexp(c) - log1mexp(r))``:
    ``loss = chosen_nll + beta * mean(-logsigmoid(log_odds))``.
    Rewards (metrics only) are ``beta * logp``, as in TRL.
    """
    w = _weights(chosen_logps, valid)
    c, r = _sanitize(chosen_logps.float(), w), _sanitize(rejected_logps.float(), w)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll + beta * _mean(-ratio, w)
    metrics = {
        "loss": loss.detach(),
        "nll": chosen_nll.detach(),
        "log_odds_ratio": _mean(ratio.detach(), w),
        "log_odds_chosen": _mean(log_odds.detach(), w),
        "logps_chosen": _mean(c.detach(), w),
        "logps_rejected": _mean(r.detach(), w),
        **_reward_metrics(beta * c, beta * r, w),
    }
    return loss, metrics


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0,
             valid: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Sigmoid DPO (Rafailov et al. 2023) with optional label smoothing (cDPO).

    Log-probabilities are SUMS over the response tokens (``average=False``); the
    reference ones come from a frozen model under ``torch.no_grad``.
    ``logits = (pc - pr) - (rc - rr)``,
    ``loss = mean(-(1 - ls) * logsigmoid(beta * logits) - ls * logsigmoid(-beta * logits))``.
    """
    w = _weights(policy_chosen_logps, valid)
    pc, pr = (_sanitize(x.float(), w) for x in (policy_chosen_logps, policy_rejected_logps))
    rc, rr = (_sanitize(x.float().detach(), w) for x in (ref_chosen_logps, ref_rejected_logps))
    logits = (pc - pr) - (rc - rr)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
              - label_smoothing * F.logsigmoid(-beta * logits))
    loss = _mean(losses, w)
    metrics = {
        "loss": loss.detach(),
        "logps_chosen": _mean(pc.detach(), w),
        "logps_rejected": _mean(pr.detach(), w),
        **_reward_metrics(beta * (pc - rc), beta * (pr - rr), w),
    }
    return loss, metrics


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float = 2.0,
               gamma: float = 0.5, valid: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024): reference-free, on MEAN response log-probabilities.

    ``loss = mean(-logsigmoid(beta * (c - r) - gamma))``; ``gamma`` is the target
    reward margin in absolute units (TRL's ``simpo_gamma``). Defaults are the
    paper's common setting (beta 2.0, gamma/beta 0.25).
    """
    w = _weights(chosen_logps, valid)
    c, r = _sanitize(chosen_logps.float(), w), _sanitize(rejected_logps.float(), w)
    loss = _mean(-F.logsigmoid(beta * (c - r) - gamma), w)
    metrics = {
        "loss": loss.detach(),
        "logps_chosen": _mean(c.detach(), w),
        "logps_rejected": _mean(r.detach(), w),
        **_reward_metrics(beta * c, beta * r, w),
    }
    return loss, metrics


def sft_loss(chosen_nll: Tensor) -> tuple[Tensor, Metrics]:
    """Supervised fine-tuning on the chosen answer: the NLL itself."""
    return chosen_nll, {"loss": chosen_nll.detach(), "nll": chosen_nll.detach()}
