"""Forward a batch through the policy and reduce it to per-pair log-probabilities.

``policy_logps(model, batch, packed=...)`` gives the same ``PairLogps`` whether
the pair is packed into one sequence or forwarded as two; the objectives in
``mint_ray.losses`` take it from there:

    out = policy_logps(model, batch, packed=True)
    loss, metrics = orpo_loss(out.chosen, out.rejected, out.chosen_nll, beta, out.valid)

NLL: ``nll_over="sequence"`` (TRL's ORPO and the original ORPO code) averages
the token NLL over the whole chosen sequence, prompt included; ``"response"``
over the chosen answer only. Both are token means over the batch, as
``CrossEntropyLoss`` computes them. ``PairLogps.nll_over`` records which one
ran. The functions default to TRL's form, the reference the loss tests and
benchmarks compare against; training passes ``loss.nll_over`` (default
``response``) explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mint_ray.errors import ConfigError
from mint_ray.training.batching import PreferenceBatch
from mint_ray.training.chunked_logprobs import layout_token_logps_chunked
from mint_ray.training.packing import Layout, layout_token_logps, packed_layout, unpacked_layout

NllOver = Literal["sequence", "response"]
# Attention implementations that apply a float 4D mask as given (checked in transformers 5.23).
PACKED_ATTENTION = ("sdpa", "eager")
DEFAULT_NLL_OVER: NllOver = "sequence"


@dataclass(frozen=True)
class PairLogps:
    """Per-pair log-probabilities of one batch (fp32, with their graph).

    ``chosen``/``rejected`` ``[B]``: mean (``average``) or summed response logps;
    ``*_tokens`` ``[B]``: response token counts; ``chosen_nll``: scalar.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_nll: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    nll_over: NllOver
    average: bool

    @property
    def valid(self) -> Tensor:
        """Pairs with tokens on both sides; pass as the objectives' ``valid``."""
        return (self.chosen_tokens > 0) & (self.rejected_tokens > 0)


def pair_logps(token_lps: Tensor, layout: Layout, nll_over: NllOver = DEFAULT_NLL_OVER,
               average: bool = True) -> PairLogps:
    """Reduce ``layout_token_logps`` output ``[N, T-1]`` to per-pair figures."""

    def per_pair(mask: Tensor) -> tuple[Tensor, Tensor]:
        # Fold the 2B rows of the unpacked layout (or the B packed rows) onto B pairs.
        total = torch.where(mask, token_lps, torch.zeros_like(token_lps)).sum(-1)
        return (total.view(-1, layout.pairs).sum(0),
                mask.sum(-1).view(-1, layout.pairs).sum(0))

    chosen_sum, chosen_n = per_pair(layout.chosen)
    rejected_sum, rejected_n = per_pair(layout.rejected)
    nll_mask = layout.chosen | layout.prompt if nll_over == "sequence" else layout.chosen
    nll_tokens = torch.where(nll_mask, token_lps, torch.zeros_like(token_lps))
    chosen_nll = -nll_tokens.sum() / nll_mask.sum().clamp(min=1)
    if average:
        chosen_sum = chosen_sum / chosen_n.clamp(min=1)
        rejected_sum = rejected_sum / rejected_n.clamp(min=1)
    return PairLogps(chosen=chosen_sum, rejected=rejected_sum, chosen_nll=chosen_nll,
                     chosen_tokens=chosen_n, rejected_tokens=rejected_n,
                     nll_over=nll_over, average=average)


def policy_logps(model: torch.nn.Module, batch: PreferenceBatch, *, packed: bool,
                 nll_over: NllOver = DEFAULT_NLL_OVER, average: bool = True,
                 chunk_tokens: int = 0) -> PairLogps:
    """One forward of ``model`` over ``batch`` (already on the model's device).

    ``packed`` picks the shared-prefix layout (one ``[prompt|chosen|rejected]``
    row per pair) or two rows per pair; results agree to float rounding.
    ``average=False`` gives summed logps (DPO); ORPO and SimPO use means.
    ``chunk_tokens > 0`` never builds the full logits: the head runs only where the
    loss reads, that many tokens at a time (``training.chunked_logprobs``).
    """
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if packed and attn not in (None, *PACKED_ATTENTION):
        raise ConfigError(f"the packed layout needs a 4D attention mask, which attention "
                          f"{attn!r} does not take: use attn_implementation sdpa or eager, "
                          f"or set loss.packed=false")
    # The packed 4D mask is added to attention scores: build it in the model's dtype.
    dtype = getattr(model, "dtype", torch.float32)
    layout = packed_layout(batch, dtype) if packed else unpacked_layout(batch)
    if chunk_tokens:
        token_lps = layout_token_logps_chunked(model, layout, nll_over == "sequence", chunk_tokens)
    else:
        token_lps = layout_token_logps(model(**layout.inputs, use_cache=False).logits, layout)
    return pair_logps(token_lps, layout, nll_over, average)
