"""Shared-prefix packing: masks, layouts, and equality with the two-sequence form."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from mint_ray.errors import ConfigError
from mint_ray.losses import dpo_loss, orpo_loss
from mint_ray.tasks import RARE_DISEASE
from mint_ray.tokenizer import EOS, train_tokenizer
from mint_ray.training.batching import (
    EncodedPair,
    PairLengthConfig,
    PreferenceBatch,
    collate_pairs,
    encode_rows,
)
from mint_ray.training.logprobs import pair_logps, policy_logps
from mint_ray.training.packing import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    layout_token_logps,
    packed_attention_mask,
    packed_layout,
    unpacked_layout,
)

DISEASES = ["Angelman syndrome", "Rett syndrome", "Marfan syndrome", "Noonan syndrome",
            "Williams syndrome", "Cornelia de Lange syndrome", "Prader-Willi syndrome",
            "Kabuki syndrome", "CHARGE syndrome", "Sotos syndrome"]
NOTES = ["Sex male Age 3 years. Seizures, hypotonia, global developmental delay, microcephaly.",
         "Sex female Age 12 years. Tall stature, arachnodactyly.",
         "Sex male Age 1 year. Short stature, ptosis, hypertelorism, scoliosis, seizures."]
# Variable answer lengths on both sides, so rows pad differently in both layouts.
ANSWERS = [(DISEASES[:4], DISEASES[-2:]), (DISEASES[:1], DISEASES[3:9]), (DISEASES[2:8],
                                                                          DISEASES[:3])]


@pytest.fixture(scope="module")
def tok() -> Any:
    texts = [RARE_DISEASE.system_prompt, RARE_DISEASE.instruction, *NOTES,
             RARE_DISEASE.format_answer(DISEASES)]
    return train_tokenizer(texts * 4, vocab_size=500)


@pytest.fixture(scope="module")
def pairs(tok: Any) -> list[EncodedPair]:
    rows = [{"prompt": RARE_DISEASE.prompt_messages(note=n),
             "chosen": RARE_DISEASE.answer_message(c), "rejected": RARE_DISEASE.answer_message(r)}
            for n, (c, r) in zip(NOTES, ANSWERS, strict=True)]
    out, stats = encode_rows(rows, tok, PairLengthConfig())
    assert stats.pairs == 3
    return out


def tiny_llama(vocab: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


def test_packed_mask_blocks_rejected_from_chosen_and_padding() -> None:
    # One row: prompt 2, chosen 2, rejected 2, pad 1.
    codes = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, PAD]])
    allowed = packed_attention_mask(codes)[0, 0] == 0
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0],
                         [1, 1, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert allowed.equal(want)
    bf16 = packed_attention_mask(codes, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.min() == torch.finfo(torch.bfloat16).min


def test_layouts_put_each_token_where_it_belongs(tok: Any, pairs: list[EncodedPair]) -> None:
    batch = collate_pairs(pairs, tok.pad_token_id)
    packed, plain = packed_layout(batch), unpacked_layout(batch)
    b = len(batch)
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        row = packed.inputs["input_ids"][i]
        assert row[: n_p + n_c + n_r].tolist() == p.prompt_ids + p.chosen_ids + p.rejected_ids
        positions = packed.inputs["position_ids"][i, : n_p + n_c + n_r].tolist()
        assert positions == [*range(n_p + n_c), *range(n_p, n_p + n_r)]
        assert plain.inputs["input_ids"][i, : n_p + n_c].tolist() == p.prompt_ids + p.chosen_ids
        assert plain.inputs["input_ids"][b + i, : n_p + n_r].tolist() == (p.prompt_ids
                                                                         + p.rejected_ids)
        assert plain.inputs["attention_mask"][i].sum().item() == n_p + n_c
        # Masked-in targets decode to the answer and its end-of-turn token, nothing else.
        chosen_text = RARE_DISEASE.format_answer(ANSWERS[i][0]) + EOS
        rejected_text = RARE_DISEASE.format_answer(ANSWERS[i][1]) + EOS
        for layout, rej_row in ((packed, i), (plain, b + i)):
            targets = layout.inputs["input_ids"][:, 1:]
            assert tok.decode(targets[i][layout.chosen[i]]) == chosen_text
            assert tok.decode(targets[rej_row][layout.rejected[rej_row]]) == rejected_text
            assert targets[i][layout.prompt[i]].tolist() == p.prompt_ids[1:]
        assert not plain.prompt[b + i].any()


def _tiny_batch(prompt: list[int], chosen: list[int], rejected: list[int]) -> PreferenceBatch:
    return collate_pairs([EncodedPair(prompt, chosen, rejected)], pad_id=0)


def test_first_rejected_token_is_read_from_the_last_prompt_position() -> None:
    batch = _tiny_batch([5, 6, 7], [8, 9], [10, 11])
    layout = packed_layout(batch)
    logits = torch.zeros(1, 7, 16)
    logits[0, 2, 10] = 5.0   # the last prompt token predicts rejected[0] = 10
    logits[0, 4, 10] = -5.0  # the last chosen token must not be used for it
    lp = layout_token_logps(logits, layout)
    column = 4  # token 5 of the row (rejected[0]) sits in shifted column 4
    assert layout.rejected[0, column]
    want = torch.log_softmax(logits[0, 2], -1)[10]
    torch.testing.assert_close(lp[0, column], want)


def _independent_logps(model: LlamaForCausalLM, pair: EncodedPair) -> tuple[float, float, float]:
    """Mean chosen/rejected logps and the chosen sequence NLL, one unpadded sequence at a time."""
    out = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        seq = torch.tensor([pair.prompt_ids + response])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), -1)
        tokens = lp.gather(-1, seq[0, 1:, None])[:, 0]
        out.append(tokens)
    n_p = len(pair.prompt_ids)
    return (out[0][n_p - 1:].mean().item(), out[1][n_p - 1:].mean().item(),
            -out[0].mean().item())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_two_sequences(tok: Any, pairs: list[EncodedPair], attn: str) -> None:
    model = tiny_llama(len(tok), attn)
    batch = collate_pairs(pairs, tok.pad_token_id)
    results = {}
    for packed in (False, True):
        model.zero_grad()
        out = policy_logps(model, batch, packed=packed)
        loss, _ = orpo_loss(out.chosen, out.rejected, out.chosen_nll, beta=0.1, valid=out.valid)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        response_nll = policy_logps(model, batch, packed=packed, nll_over="response").chosen_nll
        sums = policy_logps(model, batch, packed=packed, average=False)
        results[packed] = (out, loss.detach(), grads, response_nll.detach(), sums)
    (u, u_loss, u_grads, u_rnll, u_sums), (p, p_loss, p_grads, p_rnll, p_sums) = (
        results[False], results[True])
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(p.chosen, u.chosen, **tol)
    torch.testing.assert_close(p.rejected, u.rejected, **tol)
    torch.testing.assert_close(p.chosen_nll, u.chosen_nll, **tol)
    torch.testing.assert_close(p_rnll, u_rnll, **tol)
    torch.testing.assert_close(p_sums.chosen, u_sums.chosen, **tol)
    torch.testing.assert_close(p_sums.rejected, u_sums.rejected, **tol)
    assert p.chosen_tokens.equal(u.chosen_tokens) and p.rejected_tokens.equal(u.rejected_tokens)
    torch.testing.assert_close(p_loss, u_loss, **tol)
    for name, grad in u_grads.items():
        torch.testing.assert_close(p_grads[name], grad, **tol, msg=name)
    assert p.nll_over == "sequence" and p.average
    # Neither layout is wrong in the same way: each sequence forwarded alone, unpadded.
    for i, pair in enumerate(pairs):
        c, r, _ = _independent_logps(model, pair)
        assert u.chosen[i].item() == pytest.approx(c, abs=1e-5)
        assert u.rejected[i].item() == pytest.approx(r, abs=1e-5)
    seq_nll = sum(-_independent_logps(model, q)[2] * (len(q.prompt_ids) + len(q.chosen_ids) - 1)
                  for q in pairs) / sum(len(q.prompt_ids) + len(q.chosen_ids) - 1 for q in pairs)
    assert u.chosen_nll.item() == pytest.approx(-seq_nll, abs=1e-5)


def test_dpo_sums_through_both_layouts(tok: Any, pairs: list[EncodedPair]) -> None:
    model = tiny_llama(len(tok), "sdpa")
    batch = collate_pairs(pairs, tok.pad_token_id)
    losses = []
    for packed in (False, True):
        with torch.no_grad():
            ref = policy_logps(model, batch, packed=packed, average=False)
        out = policy_logps(model, batch, packed=packed, average=False)
        loss, metrics = dpo_loss(out.chosen + 0.5, out.rejected, ref.chosen, ref.rejected,
                                 valid=out.valid)
        losses.append(loss)
        assert metrics["reward_accuracy"].item() == 1.0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_pairs_without_response_tokens_stay_finite(tok: Any, pairs: list[EncodedPair],
                                                   packed: bool) -> None:
    """A pair with no response tokens (a lockstep pad row) is excluded, never NaN."""
    model = tiny_llama(len(tok), "sdpa")
    empty = EncodedPair(pairs[0].prompt_ids, [], [])
    batch = collate_pairs([pairs[1], empty], tok.pad_token_id)
    out = policy_logps(model, batch, packed=packed)
    assert out.valid.tolist() == [True, False]
    loss, metrics = orpo_loss(out.chosen, out.rejected, out.chosen_nll, valid=out.valid)
    loss.backward()
    assert torch.isfinite(loss) and metrics["valid_pairs"].item() == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    alone = policy_logps(model, collate_pairs([pairs[1]], tok.pad_token_id), packed=packed)
    torch.testing.assert_close(out.chosen[:1], alone.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected[:1], alone.rejected, rtol=1e-5, atol=1e-5)


def test_packed_refuses_attention_without_4d_masks(tok: Any, pairs: list[EncodedPair]) -> None:
    model = tiny_llama(len(tok), "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="packed"):
        policy_logps(model, collate_pairs(pairs, tok.pad_token_id), packed=True)


def test_processor_extras_stay_one_per_pair_in_both_layouts() -> None:
    batch = collate_pairs([EncodedPair([1, 2], [3], [4], extras={"pixel_values": torch.ones(1, 2)}),
                           EncodedPair([1], [3, 4], [5], extras={"pixel_values": torch.ones(1, 2)})],
                          pad_id=0)
    assert unpacked_layout(batch).inputs["pixel_values"].shape == (2, 2)
    assert packed_layout(batch).inputs["pixel_values"].shape == (2, 2)


class DeviceReadbacks(TorchDispatchMode):
    """Records every op that makes the host wait for a device (``meta`` stands in for the GPU):
    a value read back (``.item()``, ``int()``, ``nonzero``) or a blocking host-to-device copy."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == "meta" for t in tensors)
        name = func.overloadpacket.__name__
        if on_device and name in ("_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal"):
            self.seen.append(name)
        if name in ("_to_copy", "copy_"):
            src, dst = (args[0].device, kwargs.get("device")) if name == "_to_copy" else (args[1].device,
                                                                                        args[0].device)
            blocking = not (kwargs.get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]))
            if src.type == "cpu" and dst is not None and dst.type == "meta" and blocking:
                self.seen.append("blocking copy to the device")
        return func(*args, **kwargs)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_micro_step_reads_nothing_back_from_the_device(tok: Any, pairs: list[EncodedPair], packed: bool,
                                                         chunked: bool) -> None:
    """Layout, log-probabilities, loss: every size comes from the batch's host-side lengths."""
    from mint_ray.training.chunked_logprobs import read_positions

    batch = collate_pairs(pairs, tok.pad_token_id)
    with DeviceReadbacks() as readbacks:
        on_device = batch.to("meta", non_blocking=True)
        layout = packed_layout(on_device) if packed else unpacked_layout(on_device)
        if chunked:
            read_positions(layout, with_prompt=True)
        ids = layout.inputs["input_ids"]
        logits = torch.empty(*ids.shape, len(tok), device="meta")
        out = pair_logps(layout_token_logps(logits, layout), layout)
        orpo_loss(out.chosen, out.rejected, out.chosen_nll, valid=out.valid)
    assert readbacks.seen == []
