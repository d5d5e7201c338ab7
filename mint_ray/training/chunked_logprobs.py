"""Token log-probabilities from the last hidden states, a chunk of tokens at a time.

Why: memory. The plain path (``packing.layout_token_logps``) has the model return
logits for every position of every row, ``[N, T, V]``, then takes an fp32 copy, its
logsumexp and, in backward, a softmax of the same size. With Llama 3's 128,256-token
vocabulary and the paper's lengths that is ~10-13 GB per GPU, more than the LoRA model
states, and in the unpacked layout the rejected rows' prompt logits are never read.
Here the LM head is applied only at the positions the loss reads (``read_positions``:
the answer tokens, and the chosen prompt when the NLL runs over it), ``chunk`` tokens
at a time, inside one autograd Function that keeps no logits for backward: forward
keeps one fp32 logsumexp per token, and backward recomputes one chunk's logits at a
time. Peak extra memory is a few ``chunk x V`` buffers (the chunk's fp32 logits, the
logsumexp's temporary, a low-precision copy under bf16), whatever the batch.
Log-probabilities, logsumexps and weight gradients are accumulated in fp32; the
matmuls run in the weights' dtype, as the plain head's do.
When no head weight needs a gradient (LoRA that leaves ``lm_head`` alone, the text
recipe) forward also keeps, per token, ``W[target] - softmax @ W`` (``[tokens, hidden]``),
which is what the input gradient is made of, so backward never recomputes logits.

How the model is driven: ``layout_token_logps_chunked`` calls the model as usual, but
for that one call its output layer (``get_output_embeddings()``) returns these
log-probabilities instead of logits: the model computes its hidden states, hands them
to its head, and ``outputs.logits`` comes back as one log-probability per read
position. Heads served: ``nn.Linear`` (bias or not, tied or not) and PEFT's LoRA
``Linear`` around one (LoRA on ``lm_head``, dropout included); anything else, or a
model that post-processes its logits (soft-capping, scaling), is refused with a
``ConfigError`` naming ``loss.logits_chunk_tokens``.

ZeRO-3: the head's weights are gathered once per forward and once per backward,
never per chunk, by DeepSpeed's own module hooks, exactly as for the plain head: all
chunks run inside the one call of the head module (its pre-forward hook gathers, its
post-forward hook releases) and inside the one backward of that call (its pre-backward
hook on the module's output gathers again, its post-backward hook on the module's input
releases). For a LoRA head the PEFT wrapper owns no parameters itself and its base
weight and ``lora_B`` weights are read here directly rather than through their own
modules' forward, so they are registered as external parameters of the wrapper
(``deepspeed.zero.register_external_parameter``): DeepSpeed then gathers them with the
wrapper, once each way; ``lora_A`` and the dropout run as modules. Gradients reach the
partitioned parameters the usual way: the Function returns full-size gradients for the
parameter objects, whose accumulation nodes carry DeepSpeed's reduce-scatter hooks
(DeepSpeed's own ``LinearFunctionForZeroStage3`` works the same way).
``deepspeed.zero.GatheredParameters`` is not used: entered in forward it would gather
the head a second time beside the module hooks (which fire whenever the head module is
called), and it cannot span backward, so backward would need a gather of its own anyway.
Under ZeRO-0/1/2 parameters are whole and nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mint_ray.errors import ConfigError
from mint_ray.training.packing import Layout

FIELD = "loss.logits_chunk_tokens"
# Config keys of models whose forward post-processes the head's output (the plain
# path applies them to logits; log-probabilities returned in their place would not be).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class Reads:
    """The positions a loss reads, flattened: row, shifted column, source position, target id.

    Column ``c`` of a row holds the log-probability of token ``c + 1``; it is predicted
    from the hidden state at ``source`` (``c`` itself, except the packed first rejected
    token, predicted from the last prompt position). ``shape`` is the ``[N, T-1]`` grid.
    """

    rows: Tensor
    cols: Tensor
    sources: Tensor
    targets: Tensor
    shape: tuple[int, int]


def read_positions(layout: Layout, with_prompt: bool) -> Reads:
    """Every position whose log-probability the loss reads (``with_prompt``: the sequence NLL)."""
    # On the host copies: a nonzero on the device would wait for the device to finish.
    prompt, chosen, rejected = layout.host_masks
    mask = chosen | rejected
    if with_prompt:
        mask = mask | prompt
    ids = layout.inputs["input_ids"]
    rows, cols = (t.to(ids.device, non_blocking=True) for t in mask.nonzero(as_tuple=True))
    sources = cols
    if layout.first_rejected is not None:
        position, source = layout.first_rejected.unbind(1)
        redirect = (position[rows] >= 0) & (cols == position[rows] - 1)
        sources = torch.where(redirect, source[rows], cols)
    return Reads(rows=rows, cols=cols, sources=sources, targets=ids[rows, cols + 1],
                 shape=(mask.shape[0], mask.shape[1]))


# ---- the chunked head -------------------------------------------------------------------

# One term of the head: logits += x @ w.T. A plain head has one; a LoRA head adds
# (scaling * lora_A(dropout(x)), lora_B.weight) per active adapter.
Term = tuple[Tensor, Tensor]


def _chunk_logits(xs: tuple[Tensor, ...], ws: tuple[Tensor, ...], bias: Tensor | None,
                  start: int, end: int) -> Tensor:
    """fp32 logits ``[end - start, V]`` of one chunk: a fresh tensor, safe to modify in place."""
    logits = None
    for x, w in zip(xs, ws, strict=True):
        part = (x[start:end] @ w.T).float()
        logits = part if logits is None else logits.add_(part)
    assert logits is not None
    if bias is not None:
        logits.add_(bias.float())
    return logits


class _ChunkedLinearLogps(torch.autograd.Function):
    """``log_softmax(sum_i x_i @ w_i.T + bias)[target]`` per row, ``chunk`` rows at a time.

    ``precompute``: no weight needs a gradient, so forward keeps ``w_i[t] - softmax @ w_i``
    for the inputs that need one and backward only scales it; otherwise backward
    recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx: Any, targets: Tensor, chunk: int, precompute: bool, need: tuple[bool, ...],
                bias: Tensor | None, *terms: Tensor) -> Tensor:
        xs, ws = terms[0::2], terms[1::2]
        vocab = ws[0].shape[0]
        targets = targets.clamp(0, vocab - 1)  # ids the head never predicts (Mllama's <|image|>)
        n = targets.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=xs[0].device)
        lse = torch.empty_like(out)
        need_x = need[1::2]
        dirs = [torch.empty(x.shape, dtype=torch.float32, device=x.device) if precompute and nx else None
                for x, nx in zip(xs, need_x, strict=True)]
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            t = targets[start:end]
            logits = _chunk_logits(xs, ws, bias, start, end)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            out[start:end] = logits.gather(1, t[:, None])[:, 0] - lse[start:end]
            if any(d is not None for d in dirs):
                probs = logits.sub_(lse[start:end, None]).exp_()
                for d, w in zip(dirs, ws, strict=True):
                    if d is not None:
                        d[start:end] = w[t].float() - (probs.to(w.dtype) @ w).float()
        ctx.chunk, ctx.precompute, ctx.need = chunk, precompute, need
        ctx.has_bias = bias is not None
        ctx.dtypes = [x.dtype for x in xs]
        if precompute:
            ctx.save_for_backward(*(d for d in dirs if d is not None))
        else:
            ctx.save_for_backward(targets, lse, *([bias] if bias is not None else []), *terms)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        need_x = ctx.need[1::2]  # ctx.need: (bias, x0, w0, x1, w1, ...)
        grads_x: list[Tensor | None]
        grads_w: list[Tensor | None]
        grad_bias = None
        if ctx.precompute:
            dirs = iter(ctx.saved_tensors)
            grads_x = [(next(dirs) * grad_out[:, None]).to(dtype) if nx else None
                       for nx, dtype in zip(need_x, ctx.dtypes, strict=True)]
            grads_w = [None] * len(need_x)
        else:
            grads_x, grads_w, grad_bias = _recompute_backward(ctx, grad_out.float())
        interleaved: list[Tensor | None] = []
        for gx, gw in zip(grads_x, grads_w, strict=True):
            interleaved += [gx, gw]
        return None, None, None, None, grad_bias, *interleaved


def _recompute_backward(ctx: Any, grad_out: Tensor
                        ) -> tuple[list[Tensor | None], list[Tensor | None], Tensor | None]:
    """Input and weight gradients, recomputing one chunk's logits at a time."""
    saved = list(ctx.saved_tensors)
    targets, lse = saved[0], saved[1]
    bias = saved[2] if ctx.has_bias else None
    terms = saved[3:] if ctx.has_bias else saved[2:]
    xs, ws = terms[0::2], terms[1::2]
    need_bias, need = ctx.need[0], ctx.need[1:]
    need_x, need_w = need[0::2], need[1::2]
    grads_x = [torch.empty_like(x) if nx else None for x, nx in zip(xs, need_x, strict=True)]
    # fp32 accumulators across chunks, cast to the weights' dtype at the end.
    acc_w = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if nw else None
             for w, nw in zip(ws, need_w, strict=True)]
    acc_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
        if bias is not None and need_bias else None
    for start in range(0, targets.shape[0], ctx.chunk):
        end = min(targets.shape[0], start + ctx.chunk)
        g = grad_out[start:end, None]
        # d logp[t] / d logits = onehot(t) - softmax, times the upstream gradient.
        grad_logits = _chunk_logits(xs, ws, bias, start, end)
        grad_logits.sub_(lse[start:end, None]).exp_().mul_(-g)
        grad_logits.scatter_add_(1, targets[start:end, None], g)
        cast: dict[torch.dtype, Tensor] = {}
        for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
            if grads_x[i] is not None:
                if w.dtype not in cast:  # one low-precision copy per chunk, shared by the terms
                    cast[w.dtype] = grad_logits.to(w.dtype)
                grads_x[i][start:end] = (cast[w.dtype] @ w).to(x.dtype)
            if acc_w[i] is not None:
                acc_w[i].addmm_(grad_logits.T, x[start:end].float())
        if acc_b is not None:
            acc_b.add_(grad_logits.sum(0))
    grads_w = [a.to(w.dtype) if a is not None else None for a, w in zip(acc_w, ws, strict=True)]
    return grads_x, grads_w, acc_b.to(bias.dtype) if acc_b is not None and bias is not None else None


def chunked_linear_logps(terms: list[Term], bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
    """fp32 ``log_softmax(sum x @ w.T + bias)[targets]`` ``[n]``, ``chunk`` rows at a time.

    ``terms`` are ``(x [n, d], w [V, d])`` pairs; gradients flow to every tensor that
    requires one, as if the logits had been computed whole.
    """
    if chunk < 1:
        raise ConfigError(f"{FIELD} must be at least 1 when chunking (0 turns it off), got {chunk}")
    grad = torch.is_grad_enabled()
    need_bias = grad and bias is not None and bias.requires_grad
    need = [grad and t.requires_grad for pair in terms for t in pair]
    precompute = not need_bias and not any(need[1::2])
    flat = [t for pair in terms for t in pair]
    return _ChunkedLinearLogps.apply(targets, chunk, precompute, (need_bias, *need), bias, *flat)


# ---- driving a model --------------------------------------------------------------------


def base_model(model: Any) -> torch.nn.Module:
    """The Hugging Face model inside a callable wrapper, a DeepSpeed engine and/or PEFT."""
    if not isinstance(model, torch.nn.Module):  # a plain wrapper such as vision.MllamaForward
        model = model.model
    inner = getattr(model, "module", None)  # DeepSpeed's engine (or DDP)
    if isinstance(inner, torch.nn.Module):
        model = inner
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def _is_lora(head: torch.nn.Module) -> bool:
    return all(hasattr(head, a) for a in ("base_layer", "lora_A", "lora_B", "active_adapters"))


def output_head(model: Any) -> torch.nn.Module:
    """The model's LM head, checked to be one the chunked path computes exactly."""
    hf = base_model(model)
    config = getattr(hf, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _LOGIT_POSTPROCESSING:
            value = getattr(cfg, key, None) if cfg is not None else None
            if value not in (None, 1, 1.0):
                raise ConfigError(f"{FIELD}: this model post-processes its logits ({key}={value}), "
                                  f"which the chunked path does not apply: set {FIELD}=0")
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    base = head.base_layer if head is not None and _is_lora(head) else head
    if not isinstance(base, torch.nn.Linear):
        raise ConfigError(f"{FIELD}: the chunked path needs a linear LM head (optionally under "
                          f"LoRA), this model has {type(head).__name__}: set {FIELD}=0")
    if head is not base and (getattr(head, "lora_variant", None) or any(
            getattr(b, "bias", None) is not None for b in head.lora_B.values())):
        raise ConfigError(f"{FIELD}: a LoRA variant (DoRA) or LoRA bias on the LM head is not "
                          f"served by the chunked path: set {FIELD}=0")
    return head


def _head_terms(head: torch.nn.Module, x: Tensor) -> tuple[list[Term], Tensor | None]:
    """The head's logits as linear terms of its input ``x``, as its own forward computes them."""
    if not _is_lora(head):
        return [(x, head.weight)], head.bias
    base = head.base_layer
    terms: list[Term] = [(x, base.weight)]
    if head.disable_adapters or head.merged:
        if head.disable_adapters and head.merged:
            raise ConfigError(f"{FIELD}: a merged LoRA head with its adapter disabled is not served")
        return terms, base.bias
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        lora_a, lora_b = head.lora_A[name], head.lora_B[name]
        u = lora_a(head.lora_dropout[name](x.to(lora_a.weight.dtype))) * head.scaling[name]
        terms.append((u, lora_b.weight))
    return terms, base.bias


def _register_with_zero3(head: torch.nn.Module) -> None:
    """Under ZeRO-3, make a LoRA head's directly-read weights gather with the wrapper."""
    if not _is_lora(head):
        return  # a plain head's own hooks gather its own weight
    params = [head.base_layer.weight, head.base_layer.bias, *(b.weight for b in head.lora_B.values())]
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(head, p)


@contextmanager
def head_returns_logps(model: Any, reads: Reads, chunk: int) -> Iterator[None]:
    """For calls inside the block, the model's head returns the log-probabilities at
    ``reads`` (``[len(reads.rows)]``, fp32) in place of logits."""
    head = output_head(model)
    _register_with_zero3(head)

    def forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = hidden[reads.rows, reads.sources]
        terms, bias = _head_terms(head, x)
        return chunked_linear_logps(terms, bias, reads.targets, chunk)

    previous = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def layout_token_logps_chunked(model: Any, layout: Layout, with_prompt: bool, chunk: int) -> Tensor:
    """``layout_token_logps``'s ``[N, T-1]`` grid from one forward of ``model``, chunked.

    Only the positions in ``read_positions(layout, with_prompt)`` are computed; the
    others hold 0 (the layout's masks never read them).
    """
    reads = read_positions(layout, with_prompt)
    with head_returns_logps(model, reads, chunk):
        lps = model(**layout.inputs, use_cache=False).logits
    grid = torch.zeros(reads.shape, dtype=lps.dtype, device=lps.device)
    return grid.index_put((reads.rows, reads.cols), lps)
