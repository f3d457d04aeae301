"""Chat-format training data for the stages: LLaVA / ShareGPT and OpenAI-messages records -> model batches.

A record becomes HF chat messages, is rendered with the base model's chat template and tokenised in one
piece; labels are -100 everywhere except the assistant replies and their end-of-turn token. Images go
through the processor's image processor; videos are decoded with PyAV (optional `video` extra) and laid
out as Qwen2-VL's video processor lays them out.

`ChatDataset` checks every record when it is built (structure, media files, chat template, length) so that
bad data fails before training starts, or is skipped and counted; `collate` pads or packs samples;
`ChatDataModule` wires both for Lightning.
"""

from __future__ import annotations

import bisect
import copy
import glob
import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler
from tqdm.auto import tqdm

from hybridize.compat import (
    has_image_token_counter,
    num_image_tokens,
    qwen2_vl_smart_resize,
    returns_mm_token_type_ids,
)
from hybridize.media import import_av, load_image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ON_TOO_LONG = ("truncate", "skip", "error")
ON_BAD_SAMPLE = ("skip", "error")
# Speaker names of LLaVA / ShareGPT ("from") and OpenAI ("role") turns -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# LLaVA-style placeholders; one newline next to a placeholder belongs to it ("<image>\nWhat is this?").
PLACEHOLDER = re.compile(r"\n?(<image>|<video>)\n?")
# Tokens the Qwen-VL templates wrap around each image / video; truncation keeps or drops them with it.
VISION_WRAPPERS = ("<|vision_start|>", "<|vision_end|>")
REMOTE_PREFIXES = ("http://", "https://", "data:")
# Reasons that depend on max_length / on_too_long rather than on the record being broken.
LENGTH_REASONS = ("too_long", "no_labels_after_truncation")
SHOWN_PROBLEMS = 5


class BadSample(ValueError):
    """A record that cannot be trained on; `reason` is the key under which `skipped` counts it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------- records


def expand_data_files(files: list[str] | str) -> list[Path]:
    """Paths and glob patterns -> existing files, in the given order (each pattern's matches sorted)."""
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    paths = []
    for pattern in map(os.path.expanduser, map(str, patterns)):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(
                f"No data file matches {pattern!r}; check data.train_files / data.val_files."
            )
        for match in matches:
            if not os.path.isfile(match):
                raise FileNotFoundError(
                    f"Data file {match} does not exist; check data.train_files / data.val_files."
                )
            paths.append(Path(match))
    if not paths:
        raise ValueError("No data files given: set data.train_files to JSON / JSONL files of chat records.")
    return paths


class RecordStore:
    """The raw JSON text of every record of some files, in one byte buffer with offsets.

    DataLoader workers share one buffer without the copy-on-write growth that millions of small Python
    objects cause; a record is parsed when it is used.
    """

    def __init__(self, paths: list[Path]):
        self.files = list(paths)
        blobs, file_index, positions, self.is_lines = [], [], [], []
        for index, path in enumerate(self.files):
            records, is_lines = _read_records(path)
            self.is_lines.append(is_lines)
            for position, blob in records:
                blobs.append(blob)
                file_index.append(index)
                positions.append(position)
        self.offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.file_index = np.asarray(file_index, dtype=np.int32)
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.file_index)

    def raw(self, index: int) -> bytes:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes()

    def path(self, index: int) -> Path:
        return self.files[self.file_index[index]]

    def source(self, index: int) -> str:
        """Where record `index` is: `file:line` for JSONL, `file[record i]` for a JSON list."""
        file = self.file_index[index]
        position = int(self.positions[index])
        return (
            f"{self.files[file]}:{position}"
            if self.is_lines[file]
            else f"{self.files[file]}[record {position}]"
        )


def _read_records(path: Path) -> tuple[list[tuple[int, bytes]], bool]:
    """(position, raw JSON) of each record, and whether the file is JSON lines (position = line number)."""
    data = path.read_bytes()
    if path.suffix != ".jsonl":
        try:
            records = json.loads(data)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": a .json file that holds JSON lines
                raise ValueError(
                    f"{path} is not valid JSON ({error}); give a list of records or JSON lines."
                ) from None
        else:
            if not isinstance(records, list):
                raise ValueError(
                    f"{path} holds a JSON {type(records).__name__}; expected a list of chat records."
                )
            return [(i, json.dumps(r, ensure_ascii=False).encode()) for i, r in enumerate(records)], False
    lines = data.split(b"\n")
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()], True


# ---------------------------------------------------------------------------------------- normalisation


def normalize_record(record: Any, media_root: str | Path) -> tuple[list[dict], list[tuple[str, Path]]]:
    """A LLaVA / ShareGPT or messages-style record -> (HF chat messages, [(kind, path)] of its media in order).

    Every message's content becomes a list of parts: {"type": "text", "text": ...}, {"type": "image", "path":
    ...} or {"type": "video", "path": ...}. `<image>` / `<video>` placeholders in the text take the record's
    top-level images / videos in order; without placeholders the media go to the start of the first user turn.
    Turns after the last assistant turn are dropped (nothing in them is trained). Raises `BadSample`.
    """
    messages = [
        {"role": role, "content": _content_parts(content, i)}
        for i, (role, content) in enumerate(_turns(record))
    ]
    _fill_placeholders(record, messages)
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise BadSample(
            "no_assistant_turn", "the conversation has no assistant (gpt) turn, so nothing to train on"
        )
    messages = messages[: last_assistant + 1]
    if next(m for m in messages if m["role"] != "system")["role"] != "user":
        raise BadSample(
            "bad_turn_order",
            "the first non-system turn is the assistant's; a conversation starts with a user turn",
        )
    media = []
    for i, message in enumerate(messages):
        message["content"] = [p for p in message["content"] if p["type"] != "text" or p["text"]]
        if message["role"] == "assistant" and not any(
            p["type"] == "text" and p["text"].strip() for p in message["content"]
        ):
            raise BadSample("empty_message", f"assistant turn {i} has no text")
        for part in message["content"]:
            if part["type"] != "text":
                part["path"] = _resolve_media(part.pop("ref"), part["type"], Path(media_root))
                media.append((part["type"], part["path"]))
    return messages, media


def _turns(record: Any) -> list[tuple[str, Any]]:
    if not isinstance(record, dict):
        raise BadSample("bad_record", f"expected a JSON object, got a {type(record).__name__}")
    key = next((k for k in ("conversations", "messages") if k in record), None)
    if key is None:
        raise BadSample(
            "bad_record", 'a record needs "conversations" (LLaVA / ShareGPT) or "messages" (OpenAI / HF)'
        )
    turns = record[key]
    if not isinstance(turns, list):
        raise BadSample("bad_record", f'"{key}" must be a list of turns, got a {type(turns).__name__}')
    if not turns:
        raise BadSample("empty_conversation", f'"{key}" is empty')
    out = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if speaker is None:
            raise BadSample(
                "bad_record", f'turn {i} must be an object with "from"/"value" or "role"/"content"'
            )
        role = ROLES.get(str(speaker).lower())
        if role is None:
            raise BadSample(
                "unknown_role", f"turn {i} is from {speaker!r}; known speakers: {', '.join(ROLES)}"
            )
        out.append((role, content))
    return out


def _content_parts(content: Any, turn: int) -> list[dict]:
    """Content (a string or a list of parts) -> parts; placeholders become media parts with `ref=None`."""
    if content is None or isinstance(content, str):
        return _split_placeholders(content or "")
    if not isinstance(content, list):
        raise BadSample("bad_record", f"turn {turn}: content must be a string or a list of parts")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts += _split_placeholders(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts += _split_placeholders(part["text"])
        elif kind in ("image", "image_url", "video"):
            ref = part.get("path") or part.get(kind) or part.get("url")
            if isinstance(ref, dict):  # {"type": "image_url", "image_url": {"url": ...}}
                ref = ref.get("url")
            if not isinstance(ref, str):
                raise BadSample(
                    "bad_record", f"turn {turn}: a {kind} part needs a file path (path / {kind} / url)"
                )
            parts.append({"type": "video" if kind == "video" else "image", "ref": ref})
        else:
            raise BadSample("bad_record", f"turn {turn}: unknown content part {part!r:.80}")
    return parts


def _split_placeholders(text: str) -> list[dict]:
    parts, position = [], 0
    for match in PLACEHOLDER.finditer(text):
        parts.append({"type": "text", "text": text[position : match.start()]})
        parts.append({"type": match.group(1)[1:-1], "ref": None})
        position = match.end()
    parts.append({"type": "text", "text": text[position:]})
    return parts


def _listed(record: dict, *keys: str) -> list:
    value = next((record[k] for k in keys if record.get(k) is not None), [])
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise BadSample("bad_record", f'"{keys[0]}" must be a path or a list of paths')
    return values


def _fill_placeholders(record: dict, messages: list[dict]) -> None:
    """Give the placeholder parts their paths from the record's top-level "image(s)" / "video(s)"."""
    listed = {"image": _listed(record, "image", "images"), "video": _listed(record, "video", "videos")}
    slots = {
        kind: [p for m in messages for p in m["content"] if p["type"] == kind and p["ref"] is None]
        for kind in listed
    }
    if (
        listed["video"]
        and not listed["image"]
        and not slots["video"]
        and len(slots["image"]) == len(listed["video"])
    ):
        for part in slots["image"]:  # LLaVA-Video data marks its videos with <image>
            part["type"] = "video"
        slots = {"image": [], "video": slots["image"]}
    unplaced = []
    for kind, refs in listed.items():
        if slots[kind] and len(slots[kind]) != len(refs):
            raise BadSample(
                "placeholder_mismatch",
                f"the text has {len(slots[kind])} <{kind}> placeholder(s) but the record lists "
                f"{len(refs)} {kind}(s)",
            )
        if not slots[kind]:
            unplaced += [{"type": kind, "ref": ref} for ref in refs]
        for part, ref in zip(slots[kind], refs if slots[kind] else [], strict=True):
            part["ref"] = ref
    if unplaced:  # LLaVA convention: media without placeholders open the first user turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("bad_turn_order", "the record has media but no user turn to put them in")
        first_user["content"][:0] = unplaced


def _resolve_media(ref: str, kind: str, media_root: Path) -> Path:
    if ref.startswith(REMOTE_PREFIXES):
        raise BadSample(
            "remote_media", f"{kind} {ref[:80]!r} is not a local file; download it and refer to it by path"
        )
    path = Path(ref.removeprefix("file://")).expanduser()
    path = path if path.is_absolute() else media_root / path
    if not path.is_file():
        raise BadSample(
            "missing_media",
            f"{kind} file not found: {path} ({ref!r} resolved against {media_root}; set data.media_root "
            "if the media live elsewhere)",
        )
    return path


# ------------------------------------------------------------------------------------------------ media


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of the upright image, read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
                width, height = height, width
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some broken headers
        raise BadSample("unreadable_media", f"cannot read image {path}: {error}") from None
    return height, width


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video to decode, read from the container header."""

    frame_indices: tuple[int, ...]  # evenly spaced over the video; repeats when it has too few frames
    height: int
    width: int
    seconds_per_grid: float  # seconds covered by one temporal patch (Qwen2.5-VL's second_per_grid_ts)


def plan_video(path: Path, fps: float, max_frames: int, temporal_patch_size: int) -> VideoPlan:
    """Sample `fps` frames per second, at most `max_frames`, a multiple of `temporal_patch_size`."""
    av = import_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames
            if not total and rate:
                seconds = (
                    float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
                )
                total = round(seconds * rate)
            height, width = stream.codec_context.height, stream.codec_context.width
    except (av.FFmpegError, IndexError, TypeError, OSError) as error:
        raise BadSample("unreadable_media", f"cannot read video {path}: {error}") from None
    if not total or not rate or not height:
        raise BadSample(
            "unreadable_media", f"video {path} has no frame count, frame rate or size in its header"
        )
    seconds = total / rate
    count = min(math.floor(seconds * fps), max_frames) // temporal_patch_size * temporal_patch_size
    count = max(count, temporal_patch_size)
    indices = np.linspace(0, total - 1, count).round().astype(int)
    return VideoPlan(tuple(indices.tolist()), height, width, temporal_patch_size * seconds / count)


def decode_frames(path: Path, frame_indices: tuple[int, ...]) -> list[Image.Image]:
    """The frames at `frame_indices` as RGB images; indices past the decodable end repeat the last frame."""
    av = import_av()
    wanted, frames = set(frame_indices), {}
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    frames[index] = frame.to_image()
                if index >= frame_indices[-1]:
                    break
    except (av.FFmpegError, OSError) as error:
        raise BadSample("unreadable_media", f"cannot decode video {path}: {error}") from None
    if not frames:
        raise BadSample("unreadable_media", f"video {path} has no decodable frames")
    decoded = sorted(frames)
    return [frames[decoded[max(bisect.bisect_right(decoded, i) - 1, 0)]] for i in frame_indices]


# ----------------------------------------------------------------------------------------------- encoder


@dataclass
class MediaSpan:
    kind: str  # "image" or "video"
    start: int  # token range of the media, including its <|vision_start|> / <|vision_end|> wrapper
    end: int


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    spans: list[MediaSpan]


def load_chat_processor(processor: str | Any):
    """A processor or tokenizer: built objects pass through; names load as the model would.

    Embedded tiny models (`tiny-qwen2.5-vl`, `tiny-llama`, ...) build theirs in code; directories, short
    names and hub ids go through `load_processor` (processor, else tokenizer).
    """
    if not isinstance(processor, (str, os.PathLike)):
        return processor
    from hybridize.converters.checkpoint import embedded_models, load_processor, resolve_base

    name = str(processor)
    embedded = embedded_models()
    if name in embedded:
        return embedded[name][1](num_hidden_layers=1)[1]
    directory = Path(name).expanduser()
    loaded = load_processor(directory if directory.is_dir() else resolve_base(name))
    if loaded is None:
        raise ValueError(
            f"Cannot load a processor or tokenizer from {name!r}; set data.processor to the model directory."
        )
    return loaded


def _with_pixel_limits(processor, min_pixels: int | None, max_pixels: int | None):
    """A shallow copy of `processor` whose image processor resizes to [min_pixels, max_pixels] pixels."""
    if min_pixels is None and max_pixels is None:
        return processor
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if (
        image_processor is None
        or not hasattr(image_processor, "merge_size")
        or "longest_edge" not in dict(size or {})
    ):
        raise ValueError(
            f"data.min_pixels / data.max_pixels set the pixel budget of Qwen2-VL-style image processors; "
            f"{type(image_processor).__name__} sizes images differently. Leave them unset for this model."
        )
    from transformers.image_utils import SizeDict

    limits = dict(size)
    limits.update(
        {
            "shortest_edge": min_pixels or limits["shortest_edge"],
            "longest_edge": max_pixels or limits["longest_edge"],
        }
    )
    processor = copy.copy(processor)
    processor.image_processor = copy.deepcopy(image_processor)
    processor.image_processor.size = SizeDict(**limits)
    return processor


class ChatEncoder:
    """Chat messages -> token ids, labels and vision tensors with a model's processor (or tokenizer).

    Labels: the conversation is rendered once per turn (`apply_chat_template` on the first i messages, and
    with the generation prompt before each assistant turn); the text an assistant turn adds after its
    generation prompt is trained, up to and including its last special token (`<|im_end|>`), so the
    template's newline after it is not. This needs a template whose rendering of a conversation prefix is a
    prefix of the whole (ChatML, Llama 3, Mistral, ...). The whole text is then tokenised in one piece, as
    inference tokenises it, and each image / video placeholder token is repeated as often as the vision
    encoder emits tokens for that medium.
    """

    def __init__(
        self,
        processor,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
    ):
        self.processor = _with_pixel_limits(processor, min_pixels, max_pixels)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(self.processor, "image_processor", None)
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.chat_template = getattr(processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        name = type(processor).__name__
        if not self.chat_template:
            raise ValueError(
                f"{name} has no chat template; set one (processor.chat_template = ...) before training."
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{name}'s tokenizer is not a fast tokenizer; labels need its offset mapping.")
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError(
                f"{name}'s tokenizer has neither a pad nor an eos token; set tokenizer.pad_token."
            )
        self.special_ids = set(self.tokenizer.all_special_ids) | {
            i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }
        self.media_token_ids = {}  # token id -> "image" / "video"
        if self.image_processor is not None:
            for kind in ("image", "video"):
                token = getattr(processor, f"{kind}_token", None)
                if token is not None:
                    self.media_token_ids[self.tokenizer.convert_tokens_to_ids(token)] = kind
        self.token_ids = {kind: token for token, kind in self.media_token_ids.items()}
        wrapper_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in VISION_WRAPPERS]
        self.wrapper_ids = (
            wrapper_ids
            if self.tokenizer.unk_token_id not in wrapper_ids and None not in wrapper_ids
            else None
        )
        self.returns_mm_token_type_ids = returns_mm_token_type_ids(processor)
        self.qwen_vl = _is_qwen_vl(processor)
        self.uses_second_per_grid_ts = "second_per_grid_ts" in getattr(processor, "model_input_names", ())
        self.counts_from_sizes = self._has_size_counter()

    # ---- text

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the chat template writes it, and the character ranges that get labels."""
        previous, label_ranges = "", []
        for i, message in enumerate(messages):
            start = previous
            if message["role"] == "assistant":
                start = self._render(messages[:i], add_generation_prompt=True)
                self._check_prefix(previous, start, i, "its generation prompt")
            text = self._render(messages[: i + 1])
            self._check_prefix(start, text, i, "the next turn")
            if message["role"] == "assistant":
                label_ranges.append((len(start), len(text)))
            previous = text
        return previous, label_ranges

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.media_token_ids:  # text-only templates expect string content
            messages = [
                {"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in messages
            ]
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as error:  # jinja raises TemplateError and whatever `raise_exception` raises
            raise BadSample(
                "template_error", f"the chat template refused the conversation: {error}"
            ) from None

    @staticmethod
    def _check_prefix(prefix: str, text: str, turn: int, what: str) -> None:
        if not text.startswith(prefix):
            raise BadSample(
                "template_not_incremental",
                f"the chat template rewrites earlier text when it renders {what} of turn {turn}, so the assistant "
                "replies cannot be located for labels; use a template that renders turn by turn (ChatML, Llama 3, "
                "...): templates that edit earlier turns (e.g. dropping <think> blocks) cannot be trained this way",
            )

    def tokenize(
        self, messages: list[dict], media: list[tuple[str, Path]], counts: list[int]
    ) -> TokenizedConversation:
        """Token ids and labels of the whole conversation, medium i expanded to `counts[i]` tokens."""
        text, label_ranges = self.render(messages)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        starts = np.fromiter(
            (start for start, _ in encoding["offset_mapping"]), dtype=np.int64, count=len(ids)
        )
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        id_array = np.asarray(ids, dtype=np.int64)
        for first_char, end_char in label_ranges:
            reply = np.nonzero((starts >= first_char) & (starts < end_char))[0]
            trained = reply[: self._trained_length(id_array[reply].tolist())]
            labels[trained] = id_array[trained]
        return self._expand_media(ids, labels.tolist(), media, counts)

    def _trained_length(self, reply: list[int]) -> int:
        """How many tokens of an assistant turn are trained: all but whitespace after its last special token."""
        last_special = max((i for i, t in enumerate(reply) if t in self.special_ids), default=None)
        if last_special is not None and not self.tokenizer.decode(reply[last_special + 1 :]).strip():
            return last_special + 1
        return len(reply)

    def _expand_media(self, ids, labels, media, counts) -> TokenizedConversation:
        positions = [i for i, t in enumerate(ids) if t in self.media_token_ids]
        written = [self.media_token_ids[ids[i]] for i in positions]
        if written != [kind for kind, _ in media]:
            raise BadSample(
                "template_error",
                f"the chat template wrote media placeholders {written} for the conversation's media "
                f"{[kind for kind, _ in media]} (does the text contain literal image/video tokens?)",
            )
        out_ids, out_labels, spans, previous = [], [], [], 0
        for position, (kind, _), count in zip(positions, media, counts, strict=True):
            out_ids += ids[previous:position]
            out_labels += labels[previous:position]
            spans.append(MediaSpan(kind, len(out_ids), len(out_ids) + count))
            out_ids += [ids[position]] * count
            out_labels += [IGNORE_INDEX] * count
            previous = position + 1
        out_ids += ids[previous:]
        out_labels += labels[previous:]
        if self.wrapper_ids is not None:
            start_id, end_id = self.wrapper_ids
            for span in spans:
                if span.start > 0 and out_ids[span.start - 1] == start_id:
                    span.start -= 1
                if span.end < len(out_ids) and out_ids[span.end] == end_id:
                    span.end += 1
                out_labels[span.start : span.end] = [IGNORE_INDEX] * (span.end - span.start)
        return TokenizedConversation(out_ids, out_labels, spans)

    # ---- media

    def check_media(self, media: list[tuple[str, Path]]) -> None:
        kinds = {kind for kind, _ in media}
        for kind in sorted(kinds):
            if kind not in self.token_ids:
                raise BadSample(
                    "media_unsupported",
                    f"the record has {kind}s but {type(self.processor).__name__} has no {kind} support; give "
                    "data.processor a vision-language model or drop the media (if it is one, its processor failed "
                    "to load and its tokenizer was used: Qwen-VL video processors need torchvision)",
                )
        if "video" in kinds and not self.qwen_vl:
            raise BadSample(
                "media_unsupported",
                f"videos are laid out for Qwen2-VL / Qwen2.5-VL; {type(self.processor).__name__} is not supported",
            )

    def media_token_counts(self, media: list[tuple[str, Path]]) -> list[int]:
        """Tokens of each medium, from file headers only (no decoding)."""
        counts = []
        for kind, path in media:
            if kind == "video":
                counts.append(self._video_grid(self.plan_video(path))[1])
            elif self.counts_from_sizes:
                counts.append(self._image_token_count(*image_size(path)))
            else:
                counts.append(self._load_images([path])[0][0])
        return counts

    def media_tensors(
        self, media: list[tuple[str, Path]], images: int, videos: int
    ) -> tuple[list[int], dict]:
        """Vision tensors of the first `images` images and `videos` videos, and every medium's token count
        (1 for the media left out, which truncation drops)."""
        seen, kept = Counter(), []
        for kind, _ in media:
            kept.append(seen[kind] < (images if kind == "image" else videos))
            seen[kind] += 1
        kept_media = [medium for medium, keep in zip(media, kept, strict=True) if keep]
        image_paths = [path for kind, path in kept_media if kind == "image"]
        video_paths = [path for kind, path in kept_media if kind == "video"]
        image_counts, tensors = self._load_images(image_paths) if image_paths else ([], {})
        video_counts = []
        if video_paths:
            rows, grids, seconds = [], [], []
            for path in video_paths:
                plan = self.plan_video(path)
                pixel_rows, grid = self._video_patches(decode_frames(path, plan.frame_indices))
                rows.append(pixel_rows)
                grids.append(grid)
                seconds.append(plan.seconds_per_grid)
                video_counts.append(int(grid.prod()) // self.image_processor.merge_size**2)
            tensors.update(pixel_values_videos=torch.cat(rows), video_grid_thw=torch.stack(grids))
            if self.uses_second_per_grid_ts:
                tensors["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        loaded = {"image": iter(image_counts), "video": iter(video_counts)}
        counts = [next(loaded[kind]) if keep else 1 for (kind, _), keep in zip(media, kept, strict=True)]
        expected = self.media_token_counts(kept_media)
        if [count for count, keep in zip(counts, kept, strict=True) if keep] != expected:
            raise RuntimeError(
                f"Media of a sample give other token counts when loaded than their headers gave at setup "
                f"({expected} expected): did the processor's image settings change after the dataset was built?"
            )
        return counts, tensors

    def _has_size_counter(self) -> bool:
        if "image" not in self.token_ids:
            return False
        return has_image_token_counter(self.processor)

    def _image_token_count(self, height: int, width: int) -> int:
        try:
            return int(num_image_tokens(self.processor, height, width))
        except ValueError as error:  # e.g. an aspect ratio over 200
            raise BadSample("unreadable_media", f"image of {width}x{height} pixels: {error}") from None

    def _load_images(self, paths: list[Path]) -> tuple[list[int], dict]:
        images = []
        for path in paths:
            try:
                images.append(load_image(path))
            except (OSError, ValueError, SyntaxError) as error:
                raise BadSample("unreadable_media", f"cannot decode image {path}: {error}") from None
        out = self.image_processor(images=images, return_tensors="pt")
        tensors = {"pixel_values": out["pixel_values"]}
        if "image_grid_thw" in out:  # Qwen-VL: (num_images, 3) patch grids; tokens = patches / merge^2
            tensors["image_grid_thw"] = out["image_grid_thw"]
            counts = (out["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        elif self.counts_from_sizes:
            counts = [self._image_token_count(image.height, image.width) for image in images]
        else:
            prompt = self.tokenizer.convert_ids_to_tokens(self.token_ids["image"])
            counts = [
                self.processor(text=[prompt], images=[image])["input_ids"][0].count(self.token_ids["image"])
                for image in images
            ]
        return counts, tensors

    # ---- video (Qwen2-VL layout)

    def plan_video(self, path: Path) -> VideoPlan:
        return plan_video(
            path, self.video_fps, self.video_max_frames, self.image_processor.temporal_patch_size
        )

    @property
    def video_size(self) -> dict:
        """Pixel budget per frame: the video processor's when there is one, else the image processor's."""
        video_processor = getattr(self.processor, "video_processor", None)
        size = dict((video_processor or self.image_processor).size)
        return {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}

    def _video_grid(self, plan: VideoPlan) -> tuple[torch.Tensor, int]:
        processor = self.image_processor
        factor = processor.patch_size * processor.merge_size
        size = self.video_size
        height, width = qwen2_vl_smart_resize(
            plan.height, plan.width, factor, size["shortest_edge"], size["longest_edge"]
        )
        grid = torch.tensor(
            [
                len(plan.frame_indices) // processor.temporal_patch_size,
                height // processor.patch_size,
                width // processor.patch_size,
            ]
        )
        return grid, int(grid.prod()) // processor.merge_size**2

    def _video_patches(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (pixel rows, grid (t, h, w)) in the layout of Qwen2-VL's video processor.

        The image processor resizes, normalises and patchifies each frame as a still image (each patch row
        holds the frame `temporal_patch_size` times); one copy per frame is kept and consecutive frames are
        stacked on the temporal axis instead.
        """
        processor = self.image_processor
        out = processor(images=frames, size=self.video_size, return_tensors="pt")
        _, height, width = out["image_grid_thw"][0].tolist()
        temporal, patch, count = processor.temporal_patch_size, processor.patch_size, len(frames)
        # (frames * h * w, channels * temporal * patch * patch) -> one copy of each frame: (frames, h*w, c, p, p)
        rows = out["pixel_values"].view(count, height * width, -1, temporal, patch, patch)[:, :, :, 0]
        rows = rows.reshape(count // temporal, temporal, height * width, -1, patch, patch)
        rows = rows.permute(0, 2, 3, 1, 4, 5)  # (t, h*w, channels, temporal, patch, patch)
        grid = torch.tensor([count // temporal, height, width])
        return rows.reshape(int(grid.prod()), -1), grid

    # ---- samples

    def sample(self, tokens: TokenizedConversation, tensors: dict, length: int) -> dict[str, torch.Tensor]:
        """The first `length` tokens of a conversation with its vision tensors: one item of a `ChatDataset`."""
        input_ids = torch.tensor(tokens.input_ids[:length])
        sample = {"input_ids": input_ids, "labels": torch.tensor(tokens.labels[:length])}
        if self.returns_mm_token_type_ids:  # 0 text, 1 image, 2 video; Qwen-VL's 3-D positions need them
            types = torch.zeros_like(input_ids)
            for kind, value in (("image", 1), ("video", 2)):
                if kind in self.token_ids:
                    types[input_ids == self.token_ids[kind]] = value
            sample["mm_token_type_ids"] = types
        return sample | tensors


def _is_qwen_vl(processor) -> bool:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    return isinstance(processor, (Qwen2VLProcessor, Qwen2_5_VLProcessor))


def truncation_length(spans: list[MediaSpan], length: int, max_length: int) -> int:
    """How many tokens to keep of a sample of `length` tokens: at most `max_length`, never cutting inside an
    image / video (the cut moves to the start of the medium it would split)."""
    cut = min(length, max_length)
    for span in spans:
        if span.start < cut < span.end:
            return span.start
    return cut


# ----------------------------------------------------------------------------------------------- dataset


def check_options(
    *,
    max_length: int,
    on_too_long: str,
    on_bad_sample: str,
    video_fps: float,
    video_max_frames: int,
    min_pixels: int | None,
    max_pixels: int | None,
) -> None:
    """Refuse bad settings with the value, what is allowed and the key to change."""
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"data.on_too_long={on_too_long!r}; expected one of {', '.join(ON_TOO_LONG)}.")
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"data.on_bad_sample={on_bad_sample!r}; expected one of {', '.join(ON_BAD_SAMPLE)}.")
    if not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"data.max_length={max_length!r}; expected a positive number of tokens.")
    if video_fps <= 0 or video_max_frames < 1:
        raise ValueError(
            f"data.video_fps={video_fps} / data.video_max_frames={video_max_frames}; both must be positive."
        )
    for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and value <= 0:
            raise ValueError(f"data.{key}={value}; expected a positive pixel count or null.")
    if min_pixels and max_pixels and min_pixels > max_pixels:
        raise ValueError(f"data.min_pixels={min_pixels} is larger than data.max_pixels={max_pixels}.")


@dataclass
class _Measured:
    """What setup learns about one record without decoding media."""

    length: int = 0  # tokens kept (after truncation)
    full_length: int = 0
    images: int = 0  # media kept
    videos: int = 0
    reason: str | None = None
    detail: str = ""


class ChatDataset(Dataset):
    """Chat records of JSON / JSONL files as model inputs, every record checked when the dataset is built.

    Building it reads the files, normalises every record, checks its media files exist and are readable
    (headers only), renders and tokenises it and computes its length with its image / video tokens. Bad
    records (`BadSample` reasons) raise one error listing them (`on_bad_sample="error"`) or are skipped and
    counted in `skipped`; samples over `max_length` are cut (`"truncate"`: never inside an image or video,
    whose tensors are dropped with it), skipped or raise. Items are dicts of 1-D `input_ids`, `labels`
    (-100 except assistant replies), `mm_token_type_ids` (Qwen-VL) and vision tensors.

    `processor`: a processor or tokenizer object, a name or directory (`load_chat_processor`), or a
    `ChatEncoder` to share between datasets (then the pixel and video options are the encoder's). The other
    options are `ChatDataModule`'s; `num_workers` processes share the setup pass; `name` appears in messages.
    """

    def __init__(
        self,
        files: list[str] | str,
        processor,
        *,
        max_length: int = 4096,
        media_root: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        on_too_long: str = "truncate",
        on_bad_sample: str = "error",
        num_workers: int = 0,
        progress: bool = True,
        name: str | None = None,
    ):
        check_options(
            max_length=max_length,
            on_too_long=on_too_long,
            on_bad_sample=on_bad_sample,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        self.encoder = (
            processor
            if isinstance(processor, ChatEncoder)
            else ChatEncoder(
                load_chat_processor(processor),
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                video_fps=video_fps,
                video_max_frames=video_max_frames,
            )
        )
        self.max_length, self.on_too_long, self.on_bad_sample = max_length, on_too_long, on_bad_sample
        self.media_root = media_root
        paths = expand_data_files(files)
        self.name = name or (f"{paths[0]}" + (f" and {len(paths) - 1} more files" if len(paths) > 1 else ""))
        self.records = RecordStore(paths)
        self._check_records(num_workers, progress)

    # ---- setup pass

    def _check_records(self, num_workers: int, progress: bool) -> None:
        loader = DataLoader(_Measure(self), batch_size=64, num_workers=num_workers, collate_fn=list)
        measured = []
        with tqdm(
            total=len(self.records),
            desc=f"Checking {self.name}",
            unit="record",
            disable=not progress or rank_zero_only.rank != 0,
        ) as bar:
            for chunk in loader:
                measured += chunk
                bar.update(len(chunk))
        problems = [(i, m) for i, m in enumerate(measured) if m.reason is not None]
        bad = [(i, m) for i, m in problems if m.reason not in LENGTH_REASONS]
        if bad and self.on_bad_sample == "error":
            raise ValueError(
                self._report(
                    bad,
                    "unusable (on_bad_sample='error')",
                    "Fix these records, or set data.on_bad_sample: skip to drop them (they are counted in skipped).",
                )
            )
        too_long = [(i, m) for i, m in problems if m.reason == "too_long"]
        if too_long and self.on_too_long == "error":
            raise ValueError(
                self._report(
                    too_long,
                    f"longer than data.max_length={self.max_length} tokens (on_too_long='error')",
                    "Raise data.max_length, or set data.on_too_long: truncate (cuts at max_length, never inside "
                    "an image) or skip.",
                )
            )
        self.skipped = dict(Counter(m.reason for _, m in problems))
        kept = [i for i, m in enumerate(measured) if m.reason is None]
        if not kept:
            raise ValueError(
                f"No usable sample in {self.name}: {len(self.records)} records, skipped: {self.skipped}."
            )
        self.record_indices = np.asarray(kept, dtype=np.int64)
        self.lengths = np.asarray([measured[i].length for i in kept], dtype=np.int64)
        self.kept_media = np.asarray([(measured[i].images, measured[i].videos) for i in kept], dtype=np.int64)
        self.truncated = sum(measured[i].length < measured[i].full_length for i in kept)
        if problems:
            rank_zero_warn(self._report(problems, "skipped", ""))
        if self.truncated:
            rank_zero_info(
                f"{self.truncated} samples of {self.name} are cut to data.max_length={self.max_length}."
            )

    def _report(self, problems: list[tuple[int, _Measured]], what: str, fix: str) -> str:
        counts = Counter(m.reason for _, m in problems)
        lines = [
            f"{len(problems)} of {len(self.records)} records of {self.name} are {what}: "
            + ", ".join(f"{reason} {count}" for reason, count in counts.most_common())
        ]
        for index, m in problems[:SHOWN_PROBLEMS]:
            detail = m.detail if m.reason != "too_long" else f"{m.full_length} tokens"
            lines.append(f"  {self.records.source(index)}: {m.reason}: {detail}")
        if len(problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
        return "\n".join(lines + ([fix] if fix else []))

    def _prepare(self, record_index: int) -> tuple[list[dict], list[tuple[str, Path]]]:
        try:
            record = json.loads(self.records.raw(record_index))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadSample("invalid_json", str(error)) from None
        media_root = self.media_root or self.records.path(record_index).parent
        messages, media = normalize_record(record, media_root)
        self.encoder.check_media(media)
        return messages, media

    def measure(self, record_index: int) -> _Measured:
        """Record `record_index` checked and measured from its text and media headers (the setup pass)."""
        try:
            messages, media = self._prepare(record_index)
            tokens = self.encoder.tokenize(messages, media, self.encoder.media_token_counts(media))
        except BadSample as error:
            return _Measured(reason=error.reason, detail=error.detail)
        full = len(tokens.input_ids)
        length = truncation_length(tokens.spans, full, self.max_length)
        kept = Counter(span.kind for span in tokens.spans if span.end <= length)
        measured = _Measured(length, full, kept["image"], kept["video"])
        if full > self.max_length and self.on_too_long != "truncate":
            measured.reason = "too_long"
        elif all(label == IGNORE_INDEX for label in tokens.labels[:length]):
            truncated = length < full
            measured.reason = "no_labels_after_truncation" if truncated else "no_labels"
            measured.detail = (
                f"{full} tokens, none of the first {length} is an assistant token"
                if truncated
                else "the chat template rendered no assistant text"
            )
        return measured

    # ---- items

    def __len__(self) -> int:
        return len(self.record_indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return self.encode(position)
            except BadSample as error:  # a file that broke or changed after setup checked it
                source = self.records.source(int(self.record_indices[position]))
                if self.on_bad_sample == "error":
                    raise ValueError(
                        f"{source}: {error} (found while loading; set data.on_bad_sample: skip to replace such samples "
                        "with the next one)"
                    ) from None
                logger.warning("%s: %s; using the next sample instead", source, error)
        raise RuntimeError(f"No sample of {self.name} could be loaded.")

    def encode(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index` (of the kept samples) with decoded media, cut to its length from setup."""
        messages, media = self._prepare(int(self.record_indices[index]))
        length = int(self.lengths[index])
        images, videos = self.kept_media[index].tolist()
        counts, tensors = self.encoder.media_tensors(media, images, videos)
        tokens = self.encoder.tokenize(messages, media, counts)
        return self.encoder.sample(tokens, tensors, length)


class _Measure(Dataset):
    """The setup pass as a dataset, so that DataLoader workers share it."""

    def __init__(self, dataset: ChatDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.records)

    def __getitem__(self, index: int) -> _Measured:
        return self.dataset.measure(index)


# ---------------------------------------------------------------------------------------------- collation

TEXT_KEYS = ("input_ids", "labels", "mm_token_type_ids")
VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)
PAD_VALUES = {"labels": IGNORE_INDEX, "mm_token_type_ids": 0}


def collate(
    samples: list[dict[str, torch.Tensor]],
    pad_token_id: int,
    *,
    pack: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Samples of `ChatDataset` -> one batch; vision tensors are concatenated in sample order.

    Padded (default): `input_ids`, `labels`, `attention_mask` (and `mm_token_type_ids`) of shape (B, T),
    right-padded with `pad_token_id` / -100 / 0. Packed: samples go whole, in order, into rows of at most
    `max_length` tokens; no attention mask, instead (R, T) `position_ids` restarting at 0 for each sample and
    the flash-attention kwargs `cu_seq_lens_q/k` (int32 boundaries over the flattened rows) and
    `max_length_q/k`, as transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` makes them.
    Each sample's first label is -100 (it would be predicted from the previous sample); rows shorter than the
    longest end in one pad segment (pad tokens, labels -100, positions from 0) that cu_seq_lens counts too.
    Qwen-VL models need their 3-D positions per packed sample on top (`packing.packed_position_ids`).
    """
    if not samples:
        raise ValueError("collate got no samples.")
    batch = {}
    for key in VISION_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch | (_pack(samples, pad_token_id, max_length) if pack else _pad(samples, pad_token_id))


def _pad(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(s["input_ids"]) for s in samples)
    keys = [k for k in TEXT_KEYS if k in samples[0]]
    batch = {
        k: torch.full((len(samples), length), PAD_VALUES.get(k, pad_token_id), dtype=torch.long) for k in keys
    }
    batch["attention_mask"] = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        size = len(sample["input_ids"])
        for key in keys:
            batch[key][row, :size] = sample[key]
        batch["attention_mask"][row, :size] = 1
    return batch


def pack_rows(lengths: list[int] | np.ndarray, max_length: int | None) -> list[list[int]]:
    """Next-fit packing: consecutive samples share a row while the row stays within `max_length` tokens."""
    rows, used = [], 0
    for index, length in enumerate(lengths):
        if rows and (max_length is None or used + length <= max_length):
            rows[-1].append(index)
            used += length
        else:
            rows.append([index])
            used = length
    return rows


def _pack(samples: list[dict], pad_token_id: int, max_length: int | None) -> dict[str, Any]:
    rows = pack_rows([len(s["input_ids"]) for s in samples], max_length)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    keys = [k for k in TEXT_KEYS if k in samples[0]]
    columns = {key: [] for key in [*keys, "position_ids"]}
    segments = []  # token count of each sample and pad segment, over the flattened rows
    for row in rows:
        for sample in (samples[i] for i in row):
            labels = sample["labels"].clone()
            labels[0] = IGNORE_INDEX  # it would be predicted from the previous sample's last token
            for key in keys:
                columns[key].append(labels if key == "labels" else sample[key])
            columns["position_ids"].append(torch.arange(len(labels)))
            segments.append(len(labels))
        pad = width - sum(len(samples[i]["input_ids"]) for i in row)
        if pad:  # one pad segment, positions restarting at 0 like a sample's, never trained
            for key in keys:
                columns[key].append(torch.full((pad,), PAD_VALUES.get(key, pad_token_id), dtype=torch.long))
            columns["position_ids"].append(torch.arange(pad))
            segments.append(pad)
    batch = {key: torch.cat(parts).view(len(rows), width) for key, parts in columns.items()}
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    longest = max(segments)
    return batch | dict(
        cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest
    )


class EpochSampler(SequentialSampler):
    """Carries the epoch to `PackedBatchSampler` (Lightning calls `set_epoch` on a batch sampler's sampler)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class PackedBatchSampler(BatchSampler):
    """Batches of whole samples that fill at most `batch_size` rows of `max_length` tokens (next-fit in a
    seeded order that changes each epoch).

    Under DDP Lightning hands it a `DistributedSampler`: every rank then packs the same global order and takes
    every world-size-th batch, dropping the remainder, so all ranks run the same number of steps.
    """

    def __init__(
        self,
        sampler,
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: list[int] | np.ndarray,
        max_length: int,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.max(initial=0) > max_length:
            raise ValueError(
                f"A sample of {self.lengths.max()} tokens does not fit in rows of max_length={max_length}."
            )
        self.max_length, self.shuffle, self.seed = max_length, shuffle, seed

    def _batches(self) -> list[list[int]]:
        epoch = getattr(self.sampler, "epoch", 0)
        order = np.arange(len(self.lengths))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(order), generator=generator).numpy()
        rows = pack_rows(self.lengths[order], self.max_length)
        batches = [
            [int(order[i]) for row in rows[start : start + self.batch_size] for i in row]
            for start in range(0, len(rows), self.batch_size)
        ]
        if self.drop_last and len(rows) % self.batch_size:
            batches.pop()
        if isinstance(self.sampler, DistributedSampler):
            ranks, rank = self.sampler.num_replicas, self.sampler.rank
            return batches[rank : len(batches) // ranks * ranks : ranks]
        return batches

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


# ------------------------------------------------------------------------------------------- data module


class ChatDataModule(L.LightningDataModule):
    """Chat-format training data (LLaVA / ShareGPT or OpenAI-messages JSON / JSONL) for the training stages.

    `setup()` loads `processor`, then checks every record (see `ChatDataset`): broken records raise one error
    listing them (`on_bad_sample: error`, the default, so that data problems are seen) or are skipped and
    counted (`skip`); too-long samples are truncated (default), skipped or raise. `skipped` counts what was
    dropped, per reason. `pack: true` packs whole samples into `batch_size` rows of `max_length` tokens
    (for long-context training; see `collate`).

    Args:
        train_files / val_files: JSON (a list of records) or JSONL files, or glob patterns.
        processor: model directory, hub id or embedded tiny model name whose processor (or tokenizer) and chat
            template are used; normally filled from the model being trained. A built processor / tokenizer
            object also works (Python API).
        max_length: tokens per sample (per packed row with `pack`).
        media_root: directory that relative image / video paths are resolved against; default: the data
            file's directory.
        min_pixels / max_pixels: per-image pixel budget of Qwen2-VL-style image processors (default: the
            processor's).
        video_fps / video_max_frames: frames sampled per second of video, and at most this many.
        on_too_long: "truncate" | "skip" | "error" for samples over max_length.
        on_bad_sample: "error" | "skip" for broken records (missing media, empty conversation, unknown role...).
    """

    def __init__(
        self,
        train_files: list[str] | str,
        val_files: list[str] | str | None = None,
        processor: Any = None,
        max_length: int = 4096,
        batch_size: int = 1,
        num_workers: int = 0,
        media_root: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        on_too_long: str = "truncate",
        on_bad_sample: str = "error",
        pack: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        check_options(
            max_length=max_length,
            on_too_long=on_too_long,
            on_bad_sample=on_bad_sample,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"data.batch_size={batch_size} must be >= 1 and data.num_workers={num_workers} >= 0."
            )
        if not train_files:
            raise ValueError("data.train_files is empty; give JSON / JSONL files of chat records.")
        self.save_hyperparameters(ignore=None if isinstance(processor, (str, type(None))) else ["processor"])
        self.train_files, self.val_files, self.processor = train_files, val_files, processor
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.pack, self.shuffle, self.seed = pack, shuffle, seed
        self.dataset_options = dict(
            max_length=max_length,
            media_root=media_root,
            on_too_long=on_too_long,
            on_bad_sample=on_bad_sample,
            num_workers=num_workers,
        )
        self.encoder_options = dict(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
        )
        self.encoder: ChatEncoder | None = None
        self.train_dataset: ChatDataset | None = None
        self.val_dataset: ChatDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            raise ValueError(
                "ChatDataModule has no processor: set data.processor to the model directory, hub id or embedded "
                "name whose tokenizer and chat template the data is encoded with (the trainer normally fills it "
                "from the model checkpoint)."
            )
        if self.encoder is None:
            self.encoder = ChatEncoder(load_chat_processor(self.processor), **self.encoder_options)
        options = self.dataset_options
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = ChatDataset(
                self.train_files, self.encoder, name="data.train_files", **options
            )
        if self.val_dataset is None and self.val_files and stage in (None, "fit", "validate"):
            self.val_dataset = ChatDataset(self.val_files, self.encoder, name="data.val_files", **options)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped at setup, per reason, over the train and val data."""
        counts = Counter()
        for dataset in (self.train_dataset, self.val_dataset):
            counts.update(dataset.skipped if dataset is not None else {})
        return dict(counts)

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    def _loader(self, dataset: ChatDataset, shuffle: bool) -> DataLoader:
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        collate_fn = partial(
            collate, pad_token_id=self.pad_token_id, pack=self.pack, max_length=self.max_length
        )
        if self.pack:
            batch_sampler = PackedBatchSampler(
                EpochSampler(dataset),
                self.batch_size,
                lengths=dataset.lengths,
                max_length=self.max_length,
                shuffle=shuffle,
                seed=self.seed,
            )
            return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **workers)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate_fn,
            **workers,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and self.val_files:
            self.setup("validate")
        return self._loader(self.val_dataset, False) if self.val_dataset is not None else []
