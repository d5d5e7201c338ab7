"""Serving's request checks, called directly: images, base64 and data URLs, JSON
bodies, the task and its prompt, OpenAI chat messages, and label ids."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from mint_ray import storage
from mint_ray.serving.inputs import (
    chat_inputs,
    check_task,
    decode_base64,
    decode_image,
    parse_json,
    prompt_for,
)
from mint_ray.serving.labels import LabelIds, label_catalog, ranked_labels
from mint_ray.serving.loading import served_task
from mint_ray.serving.schemas import ChatRequest, PredictRequest, RequestError
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE, TISSUE_TYPES
from tests.serving_inputs import SMALL, b64, bomb_header, png


def code_of(fn: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(RequestError) as err:
        fn(*args)
    return err.value.status, err.value.code


def test_decode_image_accepts_and_converts() -> None:
    image = decode_image(png((40, 30), "L"), SMALL)
    assert image.size == (40, 30) and image.mode == "RGB"


@pytest.mark.parametrize(("data", "status", "code"), [
    (bomb_header(), 413, "image_too_many_pixels"),
    (png((1024, 1024), "L"), 413, "image_too_many_pixels"),  # real, compresses to a few KB
    (png((300, 300), noise=True), 413, "image_too_large"),
    (png(fmt="GIF", mode="L"), 415, "unsupported_image_format"),
    (b"not an image at all", 400, "invalid_image"),
    (png((200, 200), noise=True)[:5000], 400, "invalid_image"),  # truncated
], ids=["bomb-header", "bomb-real", "too-many-bytes", "gif", "garbage", "truncated"])
def test_decode_image_refuses(data: bytes, status: int, code: str) -> None:
    assert code_of(decode_image, data, SMALL) == (status, code)


@pytest.mark.parametrize("data", [bomb_header(), png((1024, 1024), "L")], ids=["bomb-header", "bomb-real"])
def test_too_many_pixels_quotes_the_configured_limit(data: bytes) -> None:
    with pytest.raises(RequestError) as err:
        decode_image(data, SMALL)
    assert f"more than {SMALL.max_image_pixels} pixels (max_image_pixels)" in err.value.message


def test_base64_and_data_urls() -> None:
    data = png()
    assert decode_base64(b64(data), SMALL) == data
    assert decode_base64(f"data:image/png;base64,{b64(data)}", SMALL) == data
    assert code_of(decode_base64, "***", SMALL) == (400, "invalid_image")
    assert code_of(decode_base64, "data:image/png,rawbytes", SMALL) == (400, "invalid_image")
    assert code_of(decode_base64, "A" * 400_000, SMALL) == (413, "image_too_large")


def test_parse_json_errors_never_echo_the_input() -> None:
    assert code_of(parse_json, b"{bad", PredictRequest) == (400, "malformed_json")
    assert code_of(parse_json, b"\xff\xfe", PredictRequest) == (400, "malformed_json")
    assert code_of(parse_json, b"[1, 2]", PredictRequest) == (422, "invalid_body")
    with pytest.raises(RequestError) as err:
        parse_json(b'{"task": "rare_disease", "note": "PRIVATE-NOTE", "top_k": "3"}', PredictRequest)
    assert err.value.status == 422 and err.value.param == "top_k"
    assert "PRIVATE-NOTE" not in str(err.value.details) + err.value.message
    assert code_of(parse_json, b'{"task": "x", "colour": 1}', PredictRequest)[0] == 422


def test_task_checks_and_prompt() -> None:
    assert check_task("rare_disease", RARE_DISEASE) is RARE_DISEASE
    assert code_of(check_task, "cardiology", RARE_DISEASE) == (422, "unknown_task")
    assert code_of(check_task, "tissue_type", RARE_DISEASE) == (422, "wrong_task")
    assert prompt_for(RARE_DISEASE, "a note", 3) == RARE_DISEASE.prompt_messages(note="a note", n_answers=10)
    assert prompt_for(TISSUE_TYPE, None, 7) == TISSUE_TYPE.prompt_messages(candidates=list(TISSUE_TYPES),
                                                                            n_answers=7)


def test_prompt_is_worded_as_the_model_records() -> None:
    custom = replace(RARE_DISEASE, system_prompt="You are a careful geneticist.",
                     instruction="Name {n} diagnoses after {header}")
    task = served_task({"task": "rare_disease", "prompt": custom.prompt_record(n_answers=5)})
    messages = prompt_for(task, "a note", 3)
    assert messages == custom.prompt_messages(note="a note", n_answers=5)
    assert messages[0]["content"] == "You are a careful geneticist."
    assert "Name 5 diagnoses after" in messages[1]["content"]
    assert "Name 7 diagnoses after" in prompt_for(task, "a note", 7)[1]["content"]
    # A model trained before the record existed is prompted with the task's defaults.
    assert served_task({"task": "rare_disease"}) == RARE_DISEASE
    tissue = served_task({"task": "tissue_type", "prompt": TISSUE_TYPE.prompt_record(3, ["Colon", "Liver"])})
    assert prompt_for(tissue, None, 2) == TISSUE_TYPE.prompt_messages(candidates=["Colon", "Liver"], n_answers=3)


def test_chat_inputs() -> None:
    url = f"data:image/png;base64,{b64(png())}"
    req = ChatRequest.model_validate({"messages": [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "what tissue"},
                                     {"type": "image_url", "image_url": {"url": url}}]}]})
    assert chat_inputs(req) == ("what tissue", url)
    assert chat_inputs(ChatRequest.model_validate({"messages": [{"role": "user", "content": "note"}]})) == \
        ("note", None)
    remote = ChatRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}]})
    assert code_of(chat_inputs, remote) == (422, "unsupported_image_url")
    streamed = ChatRequest.model_validate({"stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert code_of(chat_inputs, streamed) == (400, "unsupported_parameter")
    assert code_of(chat_inputs, ChatRequest.model_validate({"messages": [{"role": "system", "content": "x"}]})) \
        == (422, "invalid_field")


def test_ranked_labels_with_ids() -> None:
    ids = LabelIds({"Marfan syndrome": "OMIM:154700", "Wilson disease": "OMIM:277900"})
    text = RARE_DISEASE.format_answer(["Marfan Syndrome", "Wilsons disease", "Something else"])
    labels, parseable = ranked_labels(RARE_DISEASE, text, 2, ids)
    assert parseable
    assert [(lb.rank, lb.label, lb.id) for lb in labels] == [(1, "Marfan Syndrome", "OMIM:154700"),
                                                             (2, "Wilsons disease", "OMIM:277900")]
    labels, parseable = ranked_labels(RARE_DISEASE, "no list here", 10, ids)
    assert labels == [] and not parseable
    assert ids.lookup("Completely different") is None


def test_label_catalog_follows_the_lineage(tmp_path: Path) -> None:
    table = pa.table({"x": [1]})
    cohort = str(tmp_path / "cohort")
    storage.write_dataset(cohort, table, meta={"labels": [{"name": "Marfan syndrome", "id": "OMIM:154700"},
                                                          {"name": "No id here"}]})
    prefs = str(tmp_path / "prefs")
    storage.write_dataset(prefs, table, meta={"cohort": {"uri": cohort}})
    assert label_catalog(RARE_DISEASE, {"data_uri": prefs}, None) == {"Marfan syndrome": "OMIM:154700"}
    assert label_catalog(RARE_DISEASE, {"data_uri": ""}, cohort) == {"Marfan syndrome": "OMIM:154700"}
    assert label_catalog(RARE_DISEASE, {"data_uri": str(tmp_path / "missing")}, None) == {}
    assert label_catalog(TISSUE_TYPE, {}, None)["Head & Neck"] == "head_neck"
