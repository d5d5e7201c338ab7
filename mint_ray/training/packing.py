"""Lay a ``PreferenceBatch`` out for the forward pass: two sequences per pair, or one packed.

Unpacked (TRL's concatenated form): 2B rows, ``[prompt|chosen]`` for the B pairs
then ``[prompt|rejected]``, right-padded, with a 2D attention mask. The prompt
is forwarded twice.

Packed (shared prefix): B rows ``[prompt|chosen|rejected]`` with a float 4D mask
``[B, 1, T, T]`` (0 allowed, ``finfo(dtype).min`` blocked): causal everywhere,
and rejected tokens see the prompt but not the chosen tokens; the rejected
tokens' position ids restart at ``len(prompt)``, so every rejected token has the
context and positions it has in ``[prompt|rejected]``. Padding queries attend to
themselves only (no fully masked row); real queries never see padding.

Both layouts carry their targets on the shifted grid: column ``t - 1`` holds
the log-probability of token ``t`` from the logits at ``t - 1``. The one
exception is the packed first rejected token: it is predicted by the LAST
PROMPT token (position ``P - 1``), not by the token before it in the row (the
last chosen token); ``first_rejected`` patches that column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mint_ray.losses import token_logps
from mint_ray.training.batching import PreferenceBatch

# Segment codes of each position in a laid-out row.
PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


@dataclass(frozen=True)
class Layout:
    """A batch laid out for one forward.

    ``inputs`` are the model's keyword arguments. Masks are ``[N, T-1]`` on the
    shifted grid: ``prompt`` (prompt tokens 1..P-1 of the chosen sequence, for a
    sequence NLL), ``chosen`` and ``rejected`` (response tokens). ``pairs`` is B;
    N is 2B (unpacked) or B (packed). ``first_rejected`` (packed only) is
    ``[B, 2]``: the row position of each pair's first rejected token (-1 where
    the pair has none) and the position of the logits that predict it.
    """

    inputs: dict[str, Tensor]
    prompt: Tensor
    chosen: Tensor
    rejected: Tensor
    pairs: int
    first_rejected: Tensor | None = None


def _concat(segments: list[tuple[int, Tensor, Tensor]], total: int, pad_id: int
            ) -> tuple[Tensor, Tensor]:
    """Concatenate ``(code, ids, lens)`` segments per row: ``(ids, codes)``, both ``[B, total]``."""
    ids_0 = segments[0][1]
    pos = torch.arange(total, device=ids_0.device).expand(ids_0.shape[0], total)
    ids = torch.full_like(pos, pad_id)
    codes = torch.full_like(pos, PAD)
    start = torch.zeros_like(segments[0][2])
    for code, seg_ids, lens in segments:
        rel = pos - start[:, None]
        inside = (rel >= 0) & (rel < lens[:, None])
        values = seg_ids.gather(1, rel.clamp(0, seg_ids.shape[1] - 1))
        ids = torch.where(inside, values, ids)
        codes = torch.where(inside, code, codes)
        start = start + lens
    return ids, codes


def _pad_id(batch: PreferenceBatch) -> int:
    # Any valid id will do: padded positions are masked out of attention and targets.
    return int(batch.prompt_ids[0, 0])


def unpacked_layout(batch: PreferenceBatch) -> Layout:
    """2B rows: ``[prompt|chosen]`` x B, then ``[prompt|rejected]`` x B."""
    p, c, r = batch.prompt_lens, batch.chosen_lens, batch.rejected_lens
    total = int(torch.maximum(p + c, p + r).max())
    prompt = (PROMPT, batch.prompt_ids, p)
    pad_id = _pad_id(batch)
    chosen_ids, chosen_codes = _concat([prompt, (CHOSEN, batch.chosen_ids, c)], total, pad_id)
    rejected_ids, rejected_codes = _concat([prompt, (REJECTED, batch.rejected_ids, r)], total,
                                           pad_id)
    ids, codes = torch.cat([chosen_ids, rejected_ids]), torch.cat([chosen_codes, rejected_codes])
    target = codes[:, 1:]
    b = len(batch)
    # The prompt is predicted in both copies; a sequence NLL reads the chosen copy.
    in_chosen_row = (torch.arange(2 * b, device=ids.device) < b)[:, None]
    inputs = {"input_ids": ids, "attention_mask": (codes != PAD).long(),
              **{k: torch.cat([v, v]) for k, v in batch.extras.items()}}
    return Layout(inputs=inputs, prompt=(target == PROMPT) & in_chosen_row,
                  chosen=target == CHOSEN, rejected=target == REJECTED, pairs=b)


def packed_attention_mask(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float 4D mask ``[B, 1, T, T]`` for packed rows with segment ``codes`` ``[B, T]``."""
    t = codes.shape[1]
    idx = torch.arange(t, device=codes.device)
    causal = idx[None, :] <= idx[:, None]
    q, k = codes[:, :, None], codes[:, None, :]
    allowed = causal & (q != PAD) & (k != PAD) & ~((q == REJECTED) & (k == CHOSEN))
    allowed = allowed | ((q == PAD) & torch.eye(t, dtype=torch.bool, device=codes.device))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=codes.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def packed_layout(batch: PreferenceBatch, dtype: torch.dtype = torch.float32) -> Layout:
    """B rows ``[prompt|chosen|rejected]``; ``dtype`` is the attention mask's (the model's)."""
    p, c, r = batch.prompt_lens, batch.chosen_lens, batch.rejected_lens
    total = int((p + c + r).max())
    ids, codes = _concat([(PROMPT, batch.prompt_ids, p), (CHOSEN, batch.chosen_ids, c),
                          (REJECTED, batch.rejected_ids, r)], total, _pad_id(batch))
    pos = torch.arange(total, device=ids.device).expand_as(ids)
    position_ids = torch.where(codes == REJECTED, pos - c[:, None], pos)
    position_ids = torch.where(codes == PAD, 0, position_ids)
    target = codes[:, 1:]
    # Token P+C (the first rejected one) is predicted from position P-1.
    first = torch.stack([torch.where(r > 0, p + c, -1), p - 1], dim=1)
    inputs = {"input_ids": ids, "attention_mask": packed_attention_mask(codes, dtype),
              "position_ids": position_ids, **batch.extras}
    return Layout(inputs=inputs, prompt=target == PROMPT, chosen=target == CHOSEN,
                  rejected=target == REJECTED, pairs=len(batch), first_rejected=first)


def layout_token_logps(logits: Tensor, layout: Layout) -> Tensor:
    """fp32 log-probabilities ``[N, T-1]`` of every target token of a laid-out batch.

    Positions outside the layout's masks hold meaningless values; only read them
    through ``prompt``/``chosen``/``rejected``.
    """
    ids = layout.inputs["input_ids"]
    lp = token_logps(logits[:, :-1], ids[:, 1:])
    if layout.first_rejected is None:
        return lp
    # Packed: the first rejected token is predicted from the last prompt token's
    # logits, where [prompt|rejected] has it, not from the last chosen token's.
    rows = torch.arange(ids.shape[0], device=ids.device)
    position, source = layout.first_rejected.unbind(1)
    has = position >= 0
    position = position.clamp(min=1)
    first = token_logps(logits[rows, source.clamp(min=0)], ids[rows, position])
    hit = (torch.arange(lp.shape[1], device=lp.device)[None, :] == (position - 1)[:, None])
    return torch.where(hit & has[:, None], first[:, None], lp)
