"""Preference rows -> token ids: chat template, truncation rule, bad rows, collation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mint_ray.config import build_config
from mint_ray.errors import ConfigError, MintError
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE
from mint_ray.tokenizer import EOS, train_tokenizer
from mint_ray.training.batching import (
    DROP_REASONS,
    BatchStats,
    EncodedPair,
    EncodedPrompt,
    PairLengthConfig,
    chat_prompt_encoder,
    collate_pairs,
    encode_pair,
    encode_rows,
    prefetched,
)

DISEASES = ["Angelman syndrome", "Rett syndrome", "Marfan syndrome", "Noonan syndrome",
            "Williams syndrome", "Cornelia de Lange syndrome", "Prader-Willi syndrome",
            "Kabuki syndrome", "CHARGE syndrome", "Sotos syndrome", "Fragile X syndrome"]
TERMS = ["Seizures", "Hypotonia", "Global developmental delay", "Microcephaly", "Tall stature",
         "Arachnodactyly", "Short stature", "Ptosis", "Hypertelorism", "Scoliosis"]
NOTE = "Sex male Age 3 years 6 months Ethnicity European. " + ", ".join(TERMS[:4]) + "."
LONG_NOTE = "Sex female Age 9 years. " + ", ".join(TERMS * 12) + "."


@pytest.fixture(scope="module")
def tok() -> Any:
    texts = [RARE_DISEASE.system_prompt, RARE_DISEASE.instruction, TISSUE_TYPE.system_prompt,
             TISSUE_TYPE.instruction, NOTE, LONG_NOTE, RARE_DISEASE.format_answer(DISEASES)]
    return train_tokenizer(texts * 4, vocab_size=600)


def row(note: str = NOTE, chosen: list[str] | None = None, rejected: list[str] | None = None,
        sample_id: str = "p1") -> dict[str, Any]:
    return {"prompt": RARE_DISEASE.prompt_messages(note=note),
            "chosen": RARE_DISEASE.answer_message(DISEASES[:10] if chosen is None else chosen),
            "rejected": RARE_DISEASE.answer_message(DISEASES[-3:] if rejected is None
                                                    else rejected),
            "sample_id": sample_id}


def render(tok: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_prompt_and_responses_tokenized_with_the_chat_template(tok: Any) -> None:
    r = row()
    pair = encode_pair(r, tok, PairLengthConfig())
    assert isinstance(pair, EncodedPair) and pair.sample_id == "p1"
    assert pair.prompt_ids == ids(tok, render(tok, r["prompt"], True))
    assert tok.decode(pair.chosen_ids) == RARE_DISEASE.format_answer(DISEASES[:10]) + EOS
    assert tok.decode(pair.rejected_ids) == RARE_DISEASE.format_answer(DISEASES[-3:]) + EOS
    # With our template the split is exactly the whole conversation's tokenization.
    full = ids(tok, render(tok, r["prompt"] + r["chosen"], False))
    assert pair.prompt_ids + pair.chosen_ids == full
    assert pair.prompt_cut == pair.chosen_cut == pair.rejected_cut == 0


def test_long_note_is_cut_at_its_end_keeping_system_instruction_and_header(tok: Any) -> None:
    r = row(note=LONG_NOTE)
    full_prompt = ids(tok, render(tok, r["prompt"], True))
    cfg = PairLengthConfig(max_prompt_length=len(full_prompt) - 40, max_length=len(full_prompt) - 10)
    pairs, stats = encode_rows([r], tok, cfg)
    (pair,) = pairs
    assert len(pair.prompt_ids) == cfg.max_prompt_length and pair.prompt_cut == 40
    text = tok.decode(pair.prompt_ids)
    head = render(tok, r["prompt"], True).split("Clinical note:\n")[0] + "Clinical note:\n"
    tail = "\n\n" + RARE_DISEASE.instruction.format(n=10, header=RARE_DISEASE.header)
    assert text.startswith(head + "Sex female Age 9 years.")
    assert text.endswith(tail + EOS + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert len(text) < len(render(tok, r["prompt"], True))
    # Responses share the remaining room and keep their start (the best-ranked items).
    assert len(pair.chosen_ids) == cfg.max_length - cfg.max_prompt_length == 30
    assert tok.decode(pair.chosen_ids).startswith("POTENTIAL_DISEASES:\n1. 'Angelman")
    rejected_full = ids(tok, RARE_DISEASE.format_answer(DISEASES[-3:]) + EOS)
    assert stats.as_metrics() == {**stats.as_metrics(), "rows_in": 1, "pairs": 1,
                                  "truncated_rows": 1, "prompt_truncated": 1,
                                  "chosen_truncated": 1,
                                  "rejected_truncated": int(len(rejected_full) > 30),
                                  "prompt_tokens_cut": 40}


def test_prompt_overflow_drop_rule_and_unfittable_prompts(tok: Any) -> None:
    r = row(note=LONG_NOTE)
    n = len(ids(tok, render(tok, r["prompt"], True)))
    drop = PairLengthConfig(max_prompt_length=n - 1, max_length=n + 50, prompt_overflow="drop")
    assert encode_pair(r, tok, drop) == "prompt_too_long"
    # The note can give up all but one token; shorter than that the row is dropped.
    no_room = PairLengthConfig(max_prompt_length=40, max_length=100)
    assert encode_pair(r, tok, no_room) == "prompt_too_long"
    exactly = PairLengthConfig(max_prompt_length=n, max_length=n + 30)
    pair = encode_pair(r, tok, exactly)
    assert isinstance(pair, EncodedPair) and pair.prompt_cut == 0 and len(pair.prompt_ids) == n


def test_bad_rows_are_counted_with_their_reason(tok: Any) -> None:
    good = row(sample_id="ok")
    blank = row(sample_id="blank")
    blank["rejected"] = [{"role": "assistant", "content": "   "}]
    rows: list[Any] = [
        good,
        {**row(sample_id="empty"), "chosen": [{"role": "assistant", "content": ""}]},
        blank,
        row(chosen=DISEASES[:3], rejected=DISEASES[:3], sample_id="same"),
        {**row(sample_id="p"), "prompt": "not messages"},
        {**row(sample_id="c"), "chosen": "a plain string"},
        {**row(sample_id="u"), "rejected": [{"role": "user", "content": "x"}]},
        {"sample_id": 7, "prompt": RARE_DISEASE.prompt_messages(note=NOTE)},
    ]
    pairs, stats = encode_rows(rows, tok, PairLengthConfig())
    assert [p.sample_id for p in pairs] == ["ok"]
    assert stats.rows_in == 8 and stats.pairs == 1
    assert stats.dropped == {"empty_chosen": 1, "empty_rejected": 1, "identical": 1,
                             "malformed_prompt": 1, "malformed_chosen": 2,
                             "malformed_rejected": 1}
    assert stats.rows_in == stats.pairs + sum(stats.dropped.values())
    assert [(s.index, s.sample_id) for s in stats.skipped][:2] == [(1, "empty"), (2, "blank")]
    assert stats.skipped[-1].sample_id == "7"
    metrics = stats.as_metrics()
    assert all(f"dropped_{r}" in metrics for r in DROP_REASONS)
    assert "Seizures" not in stats.summary() and "1 pairs" in stats.summary()


def test_identical_after_truncation(tok: Any) -> None:
    r = row(chosen=DISEASES[:5], rejected=DISEASES[:4])  # same first four items
    n = len(ids(tok, render(tok, r["prompt"], True)))
    pair = encode_pair(r, tok, PairLengthConfig(max_prompt_length=n, max_length=n + 8))
    assert pair == "identical_after_truncation"


def test_config_rule_and_strictness() -> None:
    with pytest.raises(ConfigError, match="max_prompt_length"):
        build_config(PairLengthConfig, {"max_length": 700, "max_prompt_length": 700})
    with pytest.raises(ConfigError, match="unknown key 'max_len'"):
        build_config(PairLengthConfig, {"max_len": 10})
    assert PairLengthConfig().prompt_overflow == "cut_note"


def test_collate_pads_segments(tok: Any) -> None:
    pairs, _ = encode_rows([row(), row(note=LONG_NOTE, chosen=DISEASES[:2])], tok,
                           PairLengthConfig())
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert len(batch) == 2
    for name in ("prompt", "chosen", "rejected"):
        seqs = [getattr(p, f"{name}_ids") for p in pairs]
        padded, lens = getattr(batch, f"{name}_ids"), getattr(batch, f"{name}_lens")
        assert lens.tolist() == [len(s) for s in seqs]
        assert padded.shape == (2, max(len(s) for s in seqs))
        for i, s in enumerate(seqs):
            assert padded[i, : len(s)].tolist() == s
            assert (padded[i, len(s):] == tok.pad_token_id).all()
    assert batch.num_tokens() == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                     for p in pairs)
    assert batch.to("cpu").chosen_ids.equal(batch.chosen_ids)
    with pytest.raises(ValueError):
        collate_pairs([], tok.pad_token_id)


def image_row() -> dict[str, Any]:
    return {"prompt": TISSUE_TYPE.prompt_messages(candidates=["Breast", "Colon", "Liver"]),
            "chosen": TISSUE_TYPE.answer_message(["Breast", "Colon"]),
            "rejected": TISSUE_TYPE.answer_message(["Liver", "Colon"]),
            "images": ["<an image>"], "sample_id": "img"}


def test_vision_rows_go_through_the_prompt_encoder_hook(tok: Any) -> None:
    text_only = chat_prompt_encoder(tok)
    with pytest.raises(ConfigError, match="processor"):
        encode_pair(image_row(), tok, PairLengthConfig(), text_only)
    seen: list[Any] = []

    def processor_encoder(messages: list[dict[str, Any]], images: Any) -> EncodedPrompt:
        seen.append(images)
        plain = text_only(messages, None)
        return EncodedPrompt(plain.input_ids, plain.cut_span,
                             extras={"pixel_values": torch.ones(1, 3)})

    pairs, stats = encode_rows([image_row(), image_row()], tok, PairLengthConfig(),
                               processor_encoder)
    assert stats.pairs == 2 and seen == [["<an image>"], ["<an image>"]]
    assert tok.decode(pairs[0].chosen_ids) == TISSUE_TYPE.format_answer(["Breast", "Colon"]) + EOS
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch.extras["pixel_values"].shape == (2, 3)
    with pytest.raises(MintError, match="mixes"):
        collate_pairs([pairs[0], encode_pair(row(), tok, PairLengthConfig())], tok.pad_token_id)


def test_image_prompt_truncation_never_cuts_the_image_token(tok: Any) -> None:
    r = image_row()
    r["prompt"] = TISSUE_TYPE.prompt_messages(candidates=list(TISSUE_TYPE.labels))
    encoded = chat_prompt_encoder(tok)(r["prompt"], None)
    assert encoded.cut_span is not None
    start, end = encoded.cut_span
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id not in encoded.input_ids[start:end]
    assert tok.decode(encoded.input_ids[start:end]).startswith("Candidates: Adrenal")


def test_stats_merge() -> None:
    a = BatchStats(rows_in=3, pairs=2, prompt_truncated=1, dropped={"identical": 1})
    b = BatchStats(rows_in=2, pairs=1, chosen_truncated=1, dropped={"identical": 1,
                                                                   "empty_chosen": 1})
    m = a.merge(b)
    assert (m.rows_in, m.pairs, m.prompt_truncated, m.chosen_truncated) == (5, 3, 1, 1)
    assert m.dropped == {"identical": 2, "empty_chosen": 1}


def test_prefetched_keeps_order_stays_bounded_and_raises_where_the_producer_failed() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(6):
            made.append(i)
            if i == 4:
                raise ValueError("image 4 is unreadable")
            yield i

    out = prefetched(items(), depth=2)
    assert next(out) == 0
    time.sleep(0.3)
    assert len(made) <= 4  # the one handed out, two queued, one waiting for a slot
    assert [next(out) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError, match="image 4"):
        next(out)


def test_closing_prefetched_early_stops_its_thread() -> None:
    out = prefetched(iter(range(1000)), depth=1)
    assert next(out) == 0
    out.close()
    assert not [t for t in threading.enumerate() if t.name == "mint-prefetch"]
