"""Lay a ``PreferenceBatch`` out for the forward pass: two sequences per pair, or one packed.

Unpacked (TRL's concatenated form): 2B rows, ``[prompt|chosen]`` for the B pairs
then ``[prompt|rejected]``, right-padded, with a 2D attention mask. The prompt
is forwarded twice (its image is not: processor inputs stay one per pair).

Every size and index list comes from the batch's host-side ``lengths``: building
a layout on a GPU never reads a value back from it (no ``.item()``/``nonzero``),
so the host can queue the next forward while the device still runs this one.

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
    ``host_masks`` are the three masks on the CPU, for index lists (``nonzero``)
    that would otherwise wait on the device.
    """

    inputs: dict[str, Tensor]
    prompt: Tensor
    chosen: Tensor
    rejected: Tensor
    pairs: int
    host_masks: tuple[Tensor, Tensor, Tensor]
    first_rejected: Tensor | None = None


def _segment_codes(rows: list[list[tuple[int, int]]], total: int) -> Tensor:
    """``[N, total]`` segment codes on the CPU from each row's ``(code, length)`` segments."""
    codes = torch.full((len(rows), total), PAD, dtype=torch.long)
    for i, segments in enumerate(rows):
        start = 0
        for code, n in segments:
            codes[i, start:start + n] = code
            start += n
    return codes


def _concat(segments: list[tuple[Tensor, Tensor]], total: int, pad_id: int) -> Tensor:
    """Concatenate ``(ids, lens)`` segments per row into ``[B, total]`` ids (``pad_id`` after)."""
    ids_0 = segments[0][0]
    pos = torch.arange(total, device=ids_0.device).expand(ids_0.shape[0], total)
    ids = torch.full_like(pos, pad_id)
    start = torch.zeros_like(segments[0][1])
    for seg_ids, lens in segments:
        rel = pos - start[:, None]
        inside = (rel >= 0) & (rel < lens[:, None])
        values = seg_ids.gather(1, rel.clamp(0, seg_ids.shape[1] - 1))
        ids = torch.where(inside, values, ids)
        start = start + lens
    return ids


def _masks(codes: Tensor, prompt_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt (first ``prompt_rows`` rows only), chosen and rejected targets on the shifted grid."""
    target = codes[:, 1:]
    in_prompt_rows = (torch.arange(codes.shape[0]) < prompt_rows)[:, None]
    return (target == PROMPT) & in_prompt_rows, target == CHOSEN, target == REJECTED


def _on(device: torch.device, *tensors: Tensor) -> list[Tensor]:
    # Host-built tensors queue behind the device's work instead of waiting for it.
    return [t.to(device, non_blocking=True) for t in tensors]


def unpacked_layout(batch: PreferenceBatch) -> Layout:
    """2B rows: ``[prompt|chosen]`` x B, then ``[prompt|rejected]`` x B.

    Processor inputs (images) stay one per pair: the forward (``vision.MllamaForward``)
    encodes each image once and gives its states to both of the pair's rows.
    """
    total = max(p + max(c, r) for p, c, r in batch.lengths)
    b = len(batch)
    host_codes = _segment_codes([[(PROMPT, p), (CHOSEN, c)] for p, c, _ in batch.lengths]
                                + [[(PROMPT, p), (REJECTED, r)] for p, _, r in batch.lengths], total)
    prompt = (batch.prompt_ids, batch.prompt_lens)
    ids = torch.cat([_concat([prompt, (batch.chosen_ids, batch.chosen_lens)], total, batch.pad_id),
                     _concat([prompt, (batch.rejected_ids, batch.rejected_lens)], total, batch.pad_id)])
    # The prompt is predicted in both copies; a sequence NLL reads the chosen copy.
    host_masks = _masks(host_codes, b)
    codes, *masks = _on(ids.device, host_codes, *host_masks)
    inputs = {"input_ids": ids, "attention_mask": (codes != PAD).long(), **batch.extras}
    return Layout(inputs, *masks, pairs=b, host_masks=host_masks)


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
    total = max(p + c + r for p, c, r in batch.lengths)
    host_codes = _segment_codes([[(PROMPT, p), (CHOSEN, c), (REJECTED, r)]
                                 for p, c, r in batch.lengths], total)
    ids = _concat([(batch.prompt_ids, batch.prompt_lens), (batch.chosen_ids, batch.chosen_lens),
                   (batch.rejected_ids, batch.rejected_lens)], total, batch.pad_id)
    # Token P+C (the first rejected one) is predicted from position P-1.
    host_first = torch.tensor([[p + c if r > 0 else -1, p - 1] for p, c, r in batch.lengths])
    host_masks = _masks(host_codes, len(batch))
    codes, first, *masks = _on(ids.device, host_codes, host_first, *host_masks)
    pos = torch.arange(total, device=ids.device).expand_as(ids)
    position_ids = torch.where(codes == REJECTED, pos - batch.chosen_lens[:, None], pos)
    position_ids = torch.where(codes == PAD, 0, position_ids)
    inputs = {"input_ids": ids, "attention_mask": packed_attention_mask(codes, dtype),
              "position_ids": position_ids, **batch.extras}
    return Layout(inputs, *masks, pairs=len(batch), host_masks=host_masks, first_rejected=first)


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
