"""What a task is: its labels, the student's prompt, the answer format and its parser.

The preference builder writes answers with ``format_answer``, the trainer
tokenizes ``messages``, the evaluator and the server read answers back with
``parse_answer``. There is exactly one copy of each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

# The longest note (in characters: Python str length, code points) any stage takes: the
# server refuses a longer one (serving's request limit default) and the preference build
# quarantines it (``note_too_long``). One number, so a student is never trained on notes
# it could not be asked with.
MAX_NOTE_CHARS = 20_000

# Llama 3.2's chat templates write "Today Date: <date>" into the system turn: today's date
# unless the caller passes ``date_string``. One fixed date (the templates' own fallback)
# makes training, evaluation and serving render the same prompt on any day.
CHAT_DATE = "26 Jul 2024"

# "1. 'Name'", "1) Name", "**1.** Name", "- 1: Name" ...
_NUMBERED = re.compile(r"^\s*[-*•]*\s*\**\s*(\d{1,3})\s*[.):\]]\**\s*(.+?)\s*$")
_QUOTES = "'\"`‘’“”*_"
# A quoted name, closed by a quote that ends the word: "'Wilson's disease'" keeps the
# apostrophe (an inner quote followed by a letter does not close the name).
_QUOTED = re.compile(r"^['\"‘“](.+?)['\"’”](?![^\W_])")
# Where an unquoted name's explanation starts: "X - because", "X: ...", "X (gene)".
_EXPLANATION = re.compile(r"\s+[-–—:]\s+|:\s+|\s+\(")
# Where a one-line list ("1. 'A' 2. 'B' 3. 'C'") breaks into its items.
_INLINE_BREAK = re.compile(r"\s+(?=\d{1,3}\s*[.)]\s)")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """``messages`` as the student reads them: its tokenizer's chat template, with ``CHAT_DATE``
    for a template that dates the prompt. Every stage renders prompts here."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         date_string=CHAT_DATE)


@dataclass(frozen=True)
class ParsedAnswer:
    """A parsed numbered list. ``parseable`` means the header and at least one item."""

    items: list[str]
    header_found: bool

    @property
    def parseable(self) -> bool:
        return self.header_found and bool(self.items)


@dataclass(frozen=True)
class Task:
    """One task's contract. ``labels`` may be filled from a cohort (rare diseases).

    ``registered_model`` is the one MLflow registry name of the task's students: training
    registers every arm under it (versions differ by objective), evaluation, promotion, the
    demo and serving address it (``models:/<name>@champion``). Recipes and the serving
    configs that spell it out are checked against it (``tools.validate_manifests``).
    """

    name: str
    modality: Literal["text", "image"]
    header: str
    n_answers: int
    item_noun: str
    system_prompt: str
    instruction: str
    quote_items: bool
    labels: tuple[str, ...] = field(default_factory=tuple)
    registered_model: str = ""

    def registry_uri(self, alias: str = "champion") -> str:
        """``models:/<registered_model>@<alias>``: what serving loads."""
        return f"models:/{self.registered_model}@{alias}"

    # ---- prompt -----------------------------------------------------------
    def user_text(self, note: str | None = None, candidates: list[str] | None = None,
                  n_answers: int | None = None) -> str:
        """The user turn's text. Text tasks put the note first; image tasks list candidates."""
        n = n_answers or self.n_answers
        parts = []
        if self.modality == "text":
            parts.append(f"Clinical note:\n{(note or '').strip()}")
        if candidates:
            parts.append("Candidates: " + ", ".join(candidates) + ".")
        parts.append(self.instruction.format(n=n, header=self.header))
        return "\n\n".join(parts)

    def prompt_messages(self, note: str | None = None, candidates: list[str] | None = None,
                        n_answers: int | None = None) -> list[dict[str, Any]]:
        """System + user messages in TRL's conversational format.

        Image tasks use the multimodal content form (an image placeholder part
        followed by a text part), as TRL and HF processors expect.
        """
        text = self.user_text(note, candidates, n_answers)
        if self.modality == "image":
            user_content: Any = [{"type": "image", "text": None}, {"type": "text", "text": text}]
            system_content: Any = [{"type": "text", "text": self.system_prompt}]
        else:
            user_content, system_content = text, self.system_prompt
        return [{"role": "system", "content": system_content},
                {"role": "user", "content": user_content}]

    # ---- the prompt a student was trained with -----------------------------
    def prompt_record(self, n_answers: int | None = None,
                      candidates: list[str] | None = None) -> dict[str, Any]:
        """This task's prompt wording, as a student's metadata records it at training time
        (the preference stage may override the system prompt and instruction)."""
        return {"system_prompt": self.system_prompt, "instruction": self.instruction,
                "n_answers": n_answers or self.n_answers,
                "candidates": list(candidates) if candidates else None}

    def with_prompt_record(self, record: dict[str, Any] | None) -> Task:
        """This task worded as ``record`` says (None or missing keys: the task's defaults),
        with the record's answer count and candidate labels."""
        record = record or {}
        return replace(self, system_prompt=record.get("system_prompt") or self.system_prompt,
                       instruction=record.get("instruction") or self.instruction,
                       n_answers=int(record.get("n_answers") or self.n_answers),
                       labels=tuple(record.get("candidates") or self.labels))

    # ---- answer -----------------------------------------------------------
    def format_answer(self, labels: list[str]) -> str:
        """The exact answer text for a ranked list of labels."""
        lines = [self.header]
        for i, label in enumerate(labels, start=1):
            lines.append(f"{i}. '{label}'" if self.quote_items else f"{i}. {label}")
        return "\n".join(lines)

    def answer_message(self, labels: list[str]) -> list[dict[str, Any]]:
        content: Any = self.format_answer(labels)
        if self.modality == "image":
            content = [{"type": "text", "text": content}]
        return [{"role": "assistant", "content": content}]

    def parse_answer(self, text: str) -> ParsedAnswer:
        """Read a numbered list back, tolerating extra prose, missing quotes and markdown.

        Items are taken from the lines after the header (or from the whole text
        when the header is missing, flagged by ``header_found``); numbering
        restarts end the list, so a second list in trailing prose is ignored.
        """
        lines = text.splitlines()
        start = 0
        header_found = False
        key = self.header.rstrip(":").lower()
        for i, line in enumerate(lines):
            if key in line.lower():
                header_found = True
                start = i + 1
                # Header and first item on one line: "POTENTIAL_DISEASES: 1. 'X'".
                rest = line.lower().split(key, 1)[1].lstrip(": ")
                if rest:
                    lines = [*lines[: i + 1], line[len(line) - len(rest):], *lines[i + 1:]]
                break
        items: list[str] = []
        expected = 1
        for piece in (p for line in lines[start:] for p in _split_inline(line)):
            m = _NUMBERED.match(piece)
            if not m:
                continue
            number = int(m.group(1))
            if items and number <= expected - 1:
                break
            name = _clean_item(m.group(2))
            if name:
                items.append(name)
            expected = number + 1
        return ParsedAnswer(items=items, header_found=header_found)


def _split_inline(line: str) -> list[str]:
    """Split "1. A 2. B 3. C" into its items when the numbers run on consecutively.

    Anything else stays one line, so a number inside a name ("type 1. ...") never
    splits it.
    """
    pieces = _INLINE_BREAK.split(line)
    numbers = [int(m.group(1)) for piece in pieces if (m := _NUMBERED.match(piece))]
    runs_on = len(numbers) == len(pieces) and all(
        n == numbers[0] + i for i, n in enumerate(numbers))
    return pieces if runs_on else [line]


def _clean_item(raw: str) -> str:
    """Strip quotes, markdown and trailing explanations ("X - because ...", "X: ...")."""
    item = raw.strip().strip(_QUOTES).strip()
    # A quoted name followed by prose: keep the quoted part.
    m = _QUOTED.match(raw.strip())
    item = m.group(1).strip() if m else _EXPLANATION.split(item, maxsplit=1)[0]
    return item.strip().strip(_QUOTES).rstrip(".,;").strip()
