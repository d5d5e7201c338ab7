"""Chunked LM-head log-probabilities against the full-logits path.

Losses and gradients must agree within 1e-5 (fp32) for every objective, packed and
unpacked, full fine-tuning and LoRA (``lm_head`` included), the text student and
Mllama, and under ZeRO-2/3 on two ranks; the chunk size (7) divides none of the lengths.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from mint_ray.config import load_config
from mint_ray.errors import ConfigError
from mint_ray.students import LoraAdapterConfig, apply_lora
from mint_ray.training.batching import EncodedPair, PreferenceBatch, collate_pairs
from mint_ray.training.chunked_logprobs import chunked_linear_logps, read_positions
from mint_ray.training.config import Config
from mint_ray.training.logprobs import PairLogps, policy_logps
from mint_ray.training.packing import packed_layout
from mint_ray.training.vision import MllamaForward
from mint_ray.training.worker import Objective
from tests.test_packing import tiny_llama
from tests.tinymodels import make_student_dir

CHUNK = 7
VOCAB = 300
TOL = {"rtol": 1e-5, "atol": 1e-5}
# (prompt, chosen, rejected) lengths: unequal everywhere, so both layouts pad.
LENGTHS = [(11, 5, 7), (8, 9, 3), (13, 2, 6)]


def make_pairs(vocab: int, lengths: list[tuple[int, int, int]] = LENGTHS, seed: int = 1,
               first: list[int] | None = None) -> list[EncodedPair]:
    """Random token pairs; ``first`` leads every prompt (Mllama's image token)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [EncodedPair([*(first or []), *ids(p)], ids(c), ids(r)) for p, c, r in lengths]


def config(objective: str, packed: bool, chunk: int) -> Config:
    return Config.model_validate({"task": "rare_disease", "objective": objective, "data": {"uri": "unused"},
                                  "loss": {"packed": packed, "logits_chunk_tokens": chunk}})


def loss_and_grads(model: Any, batch: PreferenceBatch, objective: str, packed: bool, chunk: int,
                   params: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The worker's objective on ``batch`` (DPO against the model itself, adapter off
    under LoRA), and the gradients of ``params``' trainable parameters."""

    def reference(b: PreferenceBatch) -> PairLogps:
        off = params.disable_adapter() if hasattr(params, "disable_adapter") else torch.no_grad()
        with torch.no_grad(), off:
            return policy_logps(model, b, packed=packed, nll_over="response", average=False, chunk_tokens=chunk)

    params.zero_grad(set_to_none=True)
    loss, _ = Objective(config(objective, packed, chunk), reference)(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


def assert_chunked_equals_full(model: Any, batch: PreferenceBatch, objective: str, packed: bool,
                               params: torch.nn.Module | None = None) -> None:
    params = params if params is not None else model
    full_loss, full = loss_and_grads(model, batch, objective, packed, 0, params)
    loss, grads = loss_and_grads(model, batch, objective, packed, CHUNK, params)
    torch.testing.assert_close(loss, full_loss, **TOL)
    assert grads.keys() == full.keys() and full
    # The comparison carries signal (not every weight gets some: Mllama's vision tower
    # and cross-attention sit behind zero-initialised gates).
    gated = ("vision", "cross_attn")
    assert all(g.abs().max() > 0 for n, g in full.items() if not any(k in n for k in gated))
    for name, grad in full.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


def perturb_lora_b(model: torch.nn.Module) -> None:
    """LoRA starts with B = 0 (no gradient reaches A): give B values so both carry signal."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---- the autograd Function alone ---------------------------------------------------------


@pytest.mark.parametrize("weights_train", [True, False])
def test_function_equals_log_softmax_with_gradients(weights_train: bool) -> None:
    """Two linear terms plus a bias (a LoRA head's shape), 10 tokens in chunks of 3."""
    g = torch.Generator().manual_seed(0)
    n, v = 10, 23
    x, u = torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)
    w, b_lora, bias = torch.randn(v, 6, generator=g), torch.randn(v, 2, generator=g), torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    results = []
    for chunked in (False, True):
        leaves = [t.clone().requires_grad_(weights_train or t is x or t is u) for t in (x, u, w, b_lora, bias)]
        lx, lu, lw, lb, lbias = leaves
        if chunked:
            lp = chunked_linear_logps([(lx, lw), (lu, lb)], lbias, targets, chunk=3)
        else:
            lp = torch.log_softmax(lx @ lw.T + lu @ lb.T + lbias, -1).gather(1, targets[:, None])[:, 0]
        (lp * upstream).sum().backward()
        results.append((lp.detach(), [t.grad for t in leaves]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, **TOL)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        if want_grad is None:
            assert got_grad is None
        else:
            torch.testing.assert_close(got_grad, want_grad, **TOL)


def test_forward_keeps_no_vocabulary_sized_tensor() -> None:
    """What autograd saves for backward: the full path keeps [rows, length, V] logits,
    the chunked one nothing with a vocabulary dimension but the head's own weight."""
    model = tiny_llama(VOCAB, "sdpa")
    batch = collate_pairs(make_pairs(VOCAB), pad_id=0)
    weight = model.lm_head.weight

    def saved_shapes(chunk: int) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t is not weight and VOCAB in t.shape:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            policy_logps(model, batch, packed=True, chunk_tokens=chunk)
        return shapes

    assert saved_shapes(0)  # the full path saves logits
    assert saved_shapes(CHUNK) == []


def test_read_positions_redirect_the_packed_first_rejected_token() -> None:
    batch = collate_pairs([EncodedPair([5, 6, 7], [8, 9], [10, 11])], pad_id=0)
    reads = read_positions(packed_layout(batch), with_prompt=False)
    # Targets: chosen 8, 9 (from positions 2, 3), rejected 10 (from the last prompt
    # position 2, not from the last chosen token) and 11 (from position 5).
    assert reads.targets.tolist() == [8, 9, 10, 11]
    assert reads.sources.tolist() == [2, 3, 2, 5]
    assert reads.cols.tolist() == [2, 3, 4, 5]


# ---- parity through the model, per objective and layout -----------------------------------


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("objective", ["orpo", "dpo", "simpo", "sft"])
def test_objectives_equal_full_logits(objective: str, packed: bool) -> None:
    """Full fine-tuning: every weight, the head's included, gets the same gradient."""
    model = tiny_llama(VOCAB, "sdpa")
    batch = collate_pairs(make_pairs(VOCAB), pad_id=0)
    assert_chunked_equals_full(model, batch, objective, packed)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("targets", "objective"), [
    (["q_proj", "v_proj", "lm_head"], "orpo"),   # LoRA on the head: its B gets a gradient
    (["q_proj", "v_proj", "lm_head"], "dpo"),    # reference = adapter off, head included
    ("all-linear", "orpo"),                       # the paper's text setting: head frozen
])
def test_lora_equals_full_logits(targets: Any, objective: str, packed: bool) -> None:
    lora = LoraAdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=targets)
    model = apply_lora(tiny_llama(VOCAB, "sdpa"), lora, "causal_lm")
    perturb_lora_b(model)
    batch = collate_pairs(make_pairs(VOCAB), pad_id=0)
    assert_chunked_equals_full(model, batch, objective, packed)
    head_grads = [n for n, p in model.named_parameters() if "lm_head" in n and p.grad is not None]
    assert bool(head_grads) == (targets != "all-linear")


def test_lora_dropout_on_the_head_trains() -> None:
    """Dropout draws differ from the full path's (other positions), so no parity: finite and learning."""
    lora = LoraAdapterConfig(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "lm_head"])
    model = apply_lora(tiny_llama(VOCAB, "sdpa"), lora, "causal_lm")
    batch = collate_pairs(make_pairs(VOCAB), pad_id=0)
    loss, grads = loss_and_grads(model, batch, "orpo", True, CHUNK, model)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert any("lm_head.lora_A" in n for n in grads)


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_student_dir(tmp_path_factory.mktemp("mllama"), "tissue_type")


@pytest.mark.parametrize("packed", [False, True])
def test_mllama_with_lora_on_lm_head_equals_full_logits(mllama_dir: Path, packed: bool) -> None:
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    base = MllamaForConditionalGeneration.from_pretrained(mllama_dir, dtype=torch.float32)
    lora = LoraAdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    model = apply_lora(base, lora, "mllama")
    assert any("lm_head.lora_B" in n for n, _ in model.named_parameters())
    perturb_lora_b(model)
    batch = mllama_batch(base.config)
    assert_chunked_equals_full(MllamaForward(model, base.config.image_token_index, torch.float32), batch,
                               "orpo", packed, params=model)


def mllama_batch(config: Any) -> PreferenceBatch:
    """Random pairs for a Mllama ``config``, each prompt led by the image token, with a random image."""
    pairs = make_pairs(config.text_config.vocab_size, first=[config.image_token_index])
    g = torch.Generator().manual_seed(2)
    tiles, size = config.vision_config.max_num_tiles, config.vision_config.image_size
    for i, pair in enumerate(pairs):
        pairs[i] = EncodedPair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, extras={
            "pixel_values": torch.randn(1, 1, tiles, 3, size, size, generator=g),
            "aspect_ratio_ids": torch.tensor([[1]]),
            "aspect_ratio_mask": torch.tensor([[[1] + [0] * (tiles - 1)]])})
    return collate_pairs(pairs, pad_id=0)


# ---- refusals ------------------------------------------------------------------------------


def test_config_refuses_a_negative_chunk_size() -> None:
    with pytest.raises(ConfigError, match=r"loss\.logits_chunk_tokens"):
        load_config(Config, None, ["task=rare_disease", "data.uri=unused", "loss.logits_chunk_tokens=-1"])
    assert config("orpo", True, 0).loss.logits_chunk_tokens == 0  # 0 = off, the default


def test_heads_the_chunked_path_cannot_serve_are_refused() -> None:
    batch = collate_pairs(make_pairs(VOCAB), pad_id=0)
    capped = tiny_llama(VOCAB, "sdpa")
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match=r"loss\.logits_chunk_tokens.*final_logit_softcapping"):
        policy_logps(capped, batch, packed=True, chunk_tokens=CHUNK)
    odd = tiny_llama(VOCAB, "sdpa")
    odd.lm_head = torch.nn.Sequential(odd.lm_head)
    with pytest.raises(ConfigError, match=r"loss\.logits_chunk_tokens.*linear LM head"):
        policy_logps(odd, batch, packed=True, chunk_tokens=CHUNK)


# ---- ZeRO-2 and ZeRO-3 on two ranks (gloo) -------------------------------------------------


def _zero_rank(rank: int, port: int, out: str, stage: int) -> None:
    """One rank: LoRA (lm_head included) under ZeRO-``stage``; full vs chunked loss, gradients,
    and (ZeRO-3) how many all-gathers carried each head weight in one forward + backward."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    model = apply_lora(tiny_llama(VOCAB, "sdpa"),
                       LoraAdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]),
                       "causal_lm")
    perturb_lora_b(model)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                       if p.requires_grad], config=ds_config)
    head = engine.module.get_output_embeddings()
    watched = {"base": head.base_layer.weight, "lora_B": head.lora_B["default"].weight}
    gathers = dict.fromkeys(watched, 0)
    for param in engine.module.parameters() if stage == 3 else []:
        for attr in ("all_gather_coalesced", "all_gather"):
            original = getattr(param, attr)

            def counted(params: Any = None, *args: Any, _original: Any = original, _self: Any = param,
                        **kwargs: Any) -> Any:
                group = params if params is not None else [_self]
                for key, p in watched.items():
                    gathers[key] += any(q is p for q in group)
                return _original(params, *args, **kwargs)

            setattr(param, attr, counted)
    batch = collate_pairs(make_pairs(VOCAB, seed=10 + rank), pad_id=0)
    result: dict[str, Any] = {}
    for chunk in (0, CHUNK):
        gathers.update(dict.fromkeys(watched, 0))
        loss, _ = Objective(config("orpo", True, chunk), None)(engine, batch)
        engine.backward(loss)
        result[str(chunk)] = {"loss": loss.item(), "gathers": dict(gathers),
                              "grads": {n: safe_get_full_grad(p).flatten().tolist()
                                        for n, p in engine.module.named_parameters() if p.requires_grad}}
        engine.optimizer.zero_grad()
    result["tokens"] = len(read_positions(packed_layout(batch), with_prompt=True).rows)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_match_and_zero3_gathers_the_head_once_each_way(tmp_path: Path, stage: int) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_zero_rank, args=(port, str(tmp_path), stage), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["tokens"] > 3 * CHUNK  # several chunks
        full, chunked = result["0"], result[str(CHUNK)]
        assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-5)
        for name, grad in full["grads"].items():
            torch.testing.assert_close(torch.tensor(chunked["grads"][name]), torch.tensor(grad), **TOL, msg=name)
        # ZeRO-3: each head weight gathered once in forward and once in backward, as for the full head.
        assert chunked["gathers"] == ({"base": 2, "lora_B": 2} if stage == 3 else {"base": 0, "lora_B": 0})
        assert full["gathers"] == chunked["gathers"]
