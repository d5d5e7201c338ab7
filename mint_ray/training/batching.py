"""Preference rows -> token ids -> padded batches.

Rows are TRL's conversational preference format (what the preferences stage
writes): ``prompt`` = system + user messages, ``chosen`` / ``rejected`` =
assistant messages, plus ``sample_id`` and, for vision rows, ``images``.

Tokenization
    The prompt is rendered with the model's chat template and the generation
    header (``add_generation_prompt=True``), exactly what the evaluator and the
    server feed the model. A response is the rendered ``prompt + answer`` text
    minus the rendered prompt text (so it ends with the template's end-of-turn
    token), tokenized on its own. Splitting on text, not on ids, keeps the
    prompt ids identical to inference-time ids whatever the tokenizer merges
    across the boundary, and makes response tokens a sequence the model can
    actually emit after them. With ``mint_ray.tokenizer``'s template the result
    equals the tokenization of the whole conversation (tested).

Truncation rule (``max_prompt_length``, ``max_length``)
    1. A prompt longer than ``max_prompt_length`` is shortened inside the user's
       note only: the body of the last user message (everything before its last
       blank line; the last paragraph is the instruction and output format
       request) loses tokens from its END. The system prompt, the start of the
       note (demographics come first in these notes), the instruction and the
       generation header are never cut, so the model is always asked the real
       question in the real format. If the note would have to go entirely, or
       ``prompt_overflow="drop"``, the row is dropped as ``prompt_too_long``.
       Image placeholders are never in the note body, so they are never cut.
    2. Each response is then cut to ``max_length - len(prompt)`` tokens,
       keeping its start (the best-ranked items). ``max_prompt_length <
       max_length`` guarantees at least one response token. In the packed
       layout a pair therefore spans at most ``2 * max_length - len(prompt)``.

Bad rows are never a crash: each is skipped with one reason from
``DROP_REASONS`` and recorded in ``BatchStats`` (counts and, per row, its index
and ``sample_id``; never its text, since notes must not reach logs).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from pydantic import Field, model_validator
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mint_ray.config import StrictModel
from mint_ray.errors import ConfigError, MintError
from mint_ray.tasks import render_chat

T = TypeVar("T")

DROP_REASONS = (
    "malformed_prompt",            # not a non-empty list of {role, content} messages
    "malformed_chosen",            # not assistant message(s)
    "malformed_rejected",
    "empty_chosen",                # answer text is empty or blank
    "empty_rejected",
    "identical",                   # chosen and rejected tokenize the same: no preference
    "prompt_too_long",             # over max_prompt_length and the rule could not fit it
    "identical_after_truncation",  # responses differ only past the length limit
    "missing_image",               # a vision student's row without an image
)


class PairLengthConfig(StrictModel):
    """Length limits and the overflow rule (defaults: the paper's ORPO run)."""

    max_length: int = Field(default=1400, ge=2)
    max_prompt_length: int = Field(default=700, ge=1)
    prompt_overflow: Literal["cut_note", "drop"] = "cut_note"

    @model_validator(mode="after")
    def _prompt_shorter_than_total(self) -> PairLengthConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                             f"max_length ({self.max_length}) to leave room for the answer")
        return self


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as the model sees it.

    ``cut_span`` is the token range ``[start, end)`` that truncation may shorten
    from its end (the note body; see ``note_span``), None when nothing may be
    cut. A processor-backed encoder whose ids differ from the tokenizer's (image
    tokens expanded) must compute it on its own ids. ``extras`` are per-row
    model inputs from a processor (``pixel_values`` and the like), tensors with
    a leading batch dimension of 1.
    """

    input_ids: list[int]
    cut_span: tuple[int, int] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


# (prompt messages, images or None) -> EncodedPrompt. A vision student passes one
# built on its processor; text students use ``chat_prompt_encoder``.
PromptEncoder = Callable[[list[dict[str, Any]], Sequence[Any] | None], EncodedPrompt]


@dataclass(frozen=True)
class EncodedPair:
    """One usable preference pair, truncated. ``*_cut``: tokens removed by truncation."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    sample_id: str | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    prompt_cut: int = 0
    chosen_cut: int = 0
    rejected_cut: int = 0


@dataclass(frozen=True)
class SkippedRow:
    """A row that was not used: where it was and why (no text: notes stay out of logs)."""

    index: int
    sample_id: str | None
    reason: str


@dataclass
class BatchStats:
    """Counters over encoded rows; ``rows_in == pairs + sum(dropped.values())``."""

    rows_in: int = 0
    pairs: int = 0
    truncated_rows: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    prompt_tokens_cut: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedRow] = field(default_factory=list)

    def record(self, index: int, sample_id: str | None, result: EncodedPair | str) -> None:
        """Count one row's outcome (an ``EncodedPair`` or a drop reason)."""
        self.rows_in += 1
        if isinstance(result, str):
            self.dropped[result] = self.dropped.get(result, 0) + 1
            self.skipped.append(SkippedRow(index, sample_id, result))
            return
        self.pairs += 1
        self.truncated_rows += bool(result.prompt_cut or result.chosen_cut or result.rejected_cut)
        self.prompt_truncated += result.prompt_cut > 0
        self.chosen_truncated += result.chosen_cut > 0
        self.rejected_truncated += result.rejected_cut > 0
        self.prompt_tokens_cut += result.prompt_cut

    def merge(self, other: BatchStats) -> BatchStats:
        """The sum of two sets of counters (e.g. from two workers)."""
        dropped = dict(self.dropped)
        for reason, n in other.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        return BatchStats(
            rows_in=self.rows_in + other.rows_in, pairs=self.pairs + other.pairs,
            truncated_rows=self.truncated_rows + other.truncated_rows,
            prompt_truncated=self.prompt_truncated + other.prompt_truncated,
            chosen_truncated=self.chosen_truncated + other.chosen_truncated,
            rejected_truncated=self.rejected_truncated + other.rejected_truncated,
            prompt_tokens_cut=self.prompt_tokens_cut + other.prompt_tokens_cut,
            dropped=dropped, skipped=[*self.skipped, *other.skipped])

    def as_metrics(self) -> dict[str, int]:
        """Flat counters for MLflow: every drop reason present, zero when unused."""
        out = {"rows_in": self.rows_in, "pairs": self.pairs,
               "truncated_rows": self.truncated_rows,
               "prompt_truncated": self.prompt_truncated,
               "chosen_truncated": self.chosen_truncated,
               "rejected_truncated": self.rejected_truncated,
               "prompt_tokens_cut": self.prompt_tokens_cut}
        out.update({f"dropped_{r}": self.dropped.get(r, 0) for r in DROP_REASONS})
        return out

    def summary(self) -> str:
        """One line for the log."""
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) or "none"
        return (f"{self.rows_in} rows -> {self.pairs} pairs; truncated rows {self.truncated_rows} "
                f"(prompt {self.prompt_truncated}, chosen {self.chosen_truncated}, "
                f"rejected {self.rejected_truncated}); dropped: {dropped}")


# ---- message helpers -------------------------------------------------------------


def _content_ok(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and (p.get("type") == "image"
                                 or (p.get("type") == "text" and isinstance(p.get("text"), str)))
        for p in content)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and _content_ok(m.get("content"))
        for m in value)


def _is_answer(value: Any) -> bool:
    return _is_messages(value) and value[-1]["role"] == "assistant"


def _texts(content: str | list[dict[str, Any]]) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [p["text"] for p in content if p.get("type") == "text"]


def note_span(rendered: str, offsets: Sequence[tuple[int, int]],
              messages: list[dict[str, Any]]) -> tuple[int, int] | None:
    """Token range of the note body in a rendered prompt, for the truncation rule.

    The body is the last text part of the last user message up to its last
    blank line (the part after it is the instruction); a message without a
    blank line is all body. ``offsets`` are the
    character offsets of the rendered prompt's tokens (a fast tokenizer's
    ``offset_mapping``). Only tokens wholly inside the body are in the range.
    """
    users = [m for m in messages if m["role"] == "user"]
    texts = _texts(users[-1]["content"]) if users else []
    text = texts[-1] if texts else ""
    start = rendered.rfind(text) if text else -1
    if start < 0:
        return None
    brk = text.rfind("\n\n")
    end = start + (brk if brk >= 0 else len(text))
    inside = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]
    return (inside[0], inside[-1] + 1) if inside else None


def chat_prompt_encoder(tokenizer: PreTrainedTokenizerBase) -> PromptEncoder:
    """The text-only prompt encoder: chat template + generation header, note span from offsets."""

    def encode(messages: list[dict[str, Any]], images: Sequence[Any] | None) -> EncodedPrompt:
        if images:
            raise ConfigError("rows carry images but the prompt encoder is text-only: pass a "
                              "processor-backed prompt_encoder for a vision student")
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return EncodedPrompt(list(enc["input_ids"]),
                             note_span(text, enc["offset_mapping"], messages))

    return encode


def _response_ids(tokenizer: PreTrainedTokenizerBase, prompt_text: str,
                  conversation: list[dict[str, Any]]) -> list[int]:
    full = render_chat(tokenizer, conversation)
    if not full.startswith(prompt_text):
        raise ConfigError("the chat template does not render prompt+answer as the prompt with "
                          "its generation header followed by the answer; use a template whose "
                          "assistant turn starts with the add_generation_prompt text")
    return list(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])


# ---- encoding --------------------------------------------------------------------


def encode_pair(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                cfg: PairLengthConfig, prompt_encoder: PromptEncoder | None = None
                ) -> EncodedPair | str:
    """Tokenize and truncate one preference row: an ``EncodedPair``, or a drop reason."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if not _is_messages(prompt):
        return "malformed_prompt"
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not _is_answer(answer):
            return f"malformed_{name}"
        if not "".join(t for m in answer for t in _texts(m["content"])).strip():
            return f"empty_{name}"
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    chosen_ids = _response_ids(tokenizer, prompt_text, prompt + chosen)
    rejected_ids = _response_ids(tokenizer, prompt_text, prompt + rejected)
    if chosen_ids == rejected_ids:
        return "identical"

    encoded = (prompt_encoder or chat_prompt_encoder(tokenizer))(prompt, row.get("images"))
    prompt_ids = encoded.input_ids
    excess = len(prompt_ids) - cfg.max_prompt_length
    prompt_cut = 0
    if excess > 0:
        span = encoded.cut_span
        # Keep at least one note token: a prompt without its note carries no evidence.
        if cfg.prompt_overflow == "drop" or span is None or span[1] - span[0] <= excess:
            return "prompt_too_long"
        prompt_ids = prompt_ids[: span[1] - excess] + prompt_ids[span[1]:]
        prompt_cut = excess

    room = cfg.max_length - len(prompt_ids)
    chosen_cut, rejected_cut = max(0, len(chosen_ids) - room), max(0, len(rejected_ids) - room)
    chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if chosen_ids == rejected_ids:
        return "identical_after_truncation"
    sample_id = row.get("sample_id")
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids,
                       sample_id=None if sample_id is None else str(sample_id),
                       extras=encoded.extras, prompt_cut=prompt_cut,
                       chosen_cut=chosen_cut, rejected_cut=rejected_cut)


def encode_rows(rows: Iterable[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase,
                cfg: PairLengthConfig, prompt_encoder: PromptEncoder | None = None,
                require_image: bool = False) -> tuple[list[EncodedPair], BatchStats]:
    """Encode many rows; unusable ones are counted in the stats with their reason.

    ``require_image``: rows without an ``image_uri`` are dropped as ``missing_image``
    (a vision student needs the image on every row; see ``training.vision``).
    """
    encoder = prompt_encoder or chat_prompt_encoder(tokenizer)
    stats = BatchStats()
    pairs: list[EncodedPair] = []
    for index, row in enumerate(rows):
        sample_id = row.get("sample_id")
        if require_image and not row.get("image_uri"):
            result: EncodedPair | str = "missing_image"
        else:
            result = encode_pair(row, tokenizer, cfg, encoder)
        stats.record(index, None if sample_id is None else str(sample_id), result)
        if not isinstance(result, str):
            pairs.append(result)
    return pairs, stats


# ---- collation -------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceBatch:
    """B pairs as right-padded segments: ``*_ids`` ``[B, L]`` and ``*_lens`` ``[B]``.

    Layout-free on purpose: ``training.packing`` lays the same batch out either
    as 2B sequences ``[prompt|chosen]``, ``[prompt|rejected]`` or as B packed
    ``[prompt|chosen|rejected]`` sequences, on the model's device.
    ``lengths`` (each pair's prompt, chosen and rejected lengths) and ``pad_id``
    are host copies: the layouts take their sizes from them, so building one on a
    GPU never waits for the GPU to hand a value back.
    """

    prompt_ids: Tensor
    prompt_lens: Tensor
    chosen_ids: Tensor
    chosen_lens: Tensor
    rejected_ids: Tensor
    rejected_lens: Tensor
    lengths: tuple[tuple[int, int, int], ...]
    pad_id: int
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """The tensors on ``device``; ``non_blocking`` (from pinned memory) queues the copies
        behind the device's work instead of waiting for it to finish."""
        return dataclasses.replace(
            self, **{n: getattr(self, n).to(device, non_blocking=non_blocking) for n in _SEGMENT_FIELDS},
            extras={k: v.to(device, non_blocking=non_blocking) for k, v in self.extras.items()})

    def pin_memory(self) -> PreferenceBatch:
        """The tensors in page-locked host memory, for a ``to(cuda, non_blocking=True)``."""
        return dataclasses.replace(self, **{n: getattr(self, n).pin_memory() for n in _SEGMENT_FIELDS},
                                   extras={k: v.pin_memory() for k, v in self.extras.items()})

    def num_tokens(self) -> int:
        """Distinct tokens in the batch (prompt counted once per pair)."""
        return sum(p + c + r for p, c, r in self.lengths)


_SEGMENT_FIELDS = ("prompt_ids", "prompt_lens", "chosen_ids", "chosen_lens",
                   "rejected_ids", "rejected_lens")


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(1, *(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> PreferenceBatch:
    """Pad encoded pairs into a ``PreferenceBatch``; processor extras are concatenated."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    keys = set(pairs[0].extras)
    if any(set(p.extras) != keys for p in pairs):
        raise MintError("a batch mixes rows with and without processor inputs (images): "
                        "batch vision and text-only rows separately")
    extras = {k: torch.cat([p.extras[k] for p in pairs]) for k in sorted(keys)}
    lengths = tuple((len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return PreferenceBatch(*_pad([p.prompt_ids for p in pairs], pad_id),
                           *_pad([p.chosen_ids for p in pairs], pad_id),
                           *_pad([p.rejected_ids for p in pairs], pad_id),
                           lengths=lengths, pad_id=pad_id, extras=extras)


# ---- prefetch --------------------------------------------------------------------

_END = object()


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead by a background thread.

    The trainer's micro-batches (image reads from S3, the image processor, pinning)
    are built while the device runs the previous ones instead of between them. An
    error in the producer is raised here, at the item it failed on; closing the
    iterator early stops the thread.
    """
    slots: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((_END, err))

    thread = threading.Thread(target=produce, name="mint-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
