"""One prompt on any day: Llama 3.2's chat templates put today's date into the system turn
unless ``date_string`` is passed; training, evaluation and serving render with ``CHAT_DATE``."""

from __future__ import annotations

import ast
import time
from collections.abc import Callable

import pytest
from transformers import PreTrainedTokenizerFast

from mint_ray.serving.inputs import prompt_tokens
from mint_ray.tasks import CHAT_DATE, RARE_DISEASE, render_chat
from mint_ray.tokenizer import train_tokenizer
from mint_ray.training.batching import chat_prompt_encoder
from tests.conftest import REPO

# Llama 3.2's logic (today's date unless date_string is given) in the tiny tokenizer's
# format. The clock is read to the microsecond, so two renders a moment apart differ as
# renders on two days would.
DATED_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y %H:%M:%S.%f') %}{%- endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '\n\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '<|eot_id|>' }}"
    "{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MESSAGES = RARE_DISEASE.prompt_messages("Broad thumbs and halluces, short stature.")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = train_tokenizer([RARE_DISEASE.system_prompt, RARE_DISEASE.instruction, "Today Date: 26 Jul 2024"] * 4,
                          vocab_size=300)
    tok.chat_template = DATED_TEMPLATE
    return tok


def _two_renders(render: Callable[[], object]) -> tuple[object, object]:
    first = render()
    time.sleep(0.002)
    return first, render()


def test_the_template_dates_the_prompt_by_itself(tokenizer: PreTrainedTokenizerFast) -> None:
    """What a render without ``date_string`` does: a different prompt at another time."""
    a, b = _two_renders(lambda: tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False))
    assert a != b


def test_render_chat_fixes_the_date(tokenizer: PreTrainedTokenizerFast) -> None:
    a, b = _two_renders(lambda: render_chat(tokenizer, MESSAGES, add_generation_prompt=True))
    assert a == b and f"Today Date: {CHAT_DATE}\n" in a


def test_training_and_serving_read_the_same_dated_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    expected = tokenizer(render_chat(tokenizer, MESSAGES, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    encode = chat_prompt_encoder(tokenizer)
    a, b = _two_renders(lambda: encode(MESSAGES, None).input_ids)
    assert a == b == expected
    assert prompt_tokens(tokenizer, MESSAGES) == len(expected)


def test_prompts_are_rendered_only_by_render_chat() -> None:
    """Evaluation's and serving's ``Generator`` and training's encoder all go through
    ``render_chat``: a direct ``apply_chat_template`` would render today's date."""
    allowed = {
        "mint_ray/tasks/base.py",  # render_chat itself
        "mint_ray/students.py",  # the GGUF conversion probe: one input given to two models
    }
    callers = sorted(str(p.relative_to(REPO)) for p in (REPO / "mint_ray").rglob("*.py")
                     if any(isinstance(n, ast.Attribute) and n.attr == "apply_chat_template"
                            for n in ast.walk(ast.parse(p.read_text()))))
    assert set(callers) <= allowed, callers
