"""Record layouts -> HF chat messages and the media they refer to.

Three layouts are read: LLaVA / ShareGPT (`conversations` with `from` / `value`; `image(s)`, `video(s)` at the top
level; LLaVA-OneVision, LLaVA-Video-178K), FineVision (`images` + `texts`, a list of {user, assistant} exchanges) and
messages-style (`messages` with `role` / `content`; media in the content parts or, as `{"type": "image"}` parts
without a reference, in an `images` / `videos` column). A medium is a file path, image bytes (a `datasets` Image
column, read with `decode=False`), a PIL image, or for a video a list of frames.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image


class BadSample(ValueError):
    """A record that cannot be trained on; `reason` is the key under which `skipped` counts it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# Speaker names of LLaVA / ShareGPT ("from") and OpenAI ("role") turns -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# LLaVA-style placeholders; one newline next to a placeholder belongs to it ("<image>\nWhat is this?").
PLACEHOLDER = re.compile(r"\n?(<image>|<video>)\n?")
REMOTE_PREFIXES = ("http://", "https://", "data:")
# Layout name -> the column that identifies it (checked in this order) and what the layout reads.
LAYOUTS = {
    "llava": ("conversations", "conversations (from / value) + image / images / video / videos"),
    "finevision": ("texts", "texts (a list of {user, assistant}) + images"),
    "messages": ("messages", "messages (role / content) + images / videos"),
}

# A medium as a record gives it: a file (Path), encoded image bytes, a decoded PIL image, or a video as frames.
MediaSource = Path | bytes | Image.Image | list


def detect_layout(columns: Iterable[str], layout: str = "auto", where: str = "the data") -> str:
    """The layout of records with these columns: `layout` itself when named (its column must be there), else the
    first layout whose identifying column is present; an error listing the columns when none fits."""
    columns = list(columns)
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"format={layout!r} for {where}; expected auto or one of {', '.join(LAYOUTS)}.")
        if LAYOUTS[layout][0] not in columns:
            raise ValueError(
                f"{where} has no {LAYOUTS[layout][0]!r} column, which format={layout!r} reads; its columns are "
                f"{columns}. Name the layout that fits (format: auto detects it) or rename the column."
            )
        return layout
    found = next((name for name, (column, _) in LAYOUTS.items() if column in columns), None)
    if found is None:
        known = "; ".join(f"{name}: {what}" for name, (_, what) in LAYOUTS.items())
        raise ValueError(
            f"{where} has columns {columns}, which fit no known record layout ({known}). Rename the columns "
            "(datasets' rename_column) or convert the records to one of these layouts."
        )
    return found


def to_chat_record(row: dict, layout: str) -> dict:
    """A row of a `layout` data set as a LLaVA or messages record (what `normalize_record` reads)."""
    if layout != "finevision":
        return row
    texts = row.get("texts")
    if not isinstance(texts, list):
        raise BadSample(
            "bad_record", f'"texts" must be a list of {{user, assistant}} exchanges, got {texts!r:.80}'
        )
    turns = []
    for exchange in texts:
        if not isinstance(exchange, dict):
            raise BadSample(
                "bad_record", f'an exchange of "texts" is {exchange!r:.80}, not {{user, assistant}}'
            )
        turns += [
            {"from": "human", "value": exchange.get("user")},
            {"from": "gpt", "value": exchange.get("assistant")},
        ]
    return {"images": row.get("images"), "conversations": turns}


def normalize_record(record: Any, media_root: str | Path) -> tuple[list[dict], list[tuple[str, MediaSource]]]:
    """A LLaVA / ShareGPT or messages-style record -> (HF chat messages, [(kind, source)] of its media in order).

    Every message's content becomes a list of parts: {"type": "text", "text": ...}, {"type": "image", "source":
    ...} or {"type": "video", "source": ...}. `<image>` / `<video>` placeholders in the text and media parts
    without a reference take the record's top-level images / videos in order; without placeholders the media go
    to the start of the first user turn. Relative paths are resolved against `media_root`.
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
                part["source"] = _resolve_media(part.pop("ref"), part["type"], Path(media_root))
                media.append((part["type"], part["source"]))
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
    """Content (a string or a list of parts) -> parts; placeholders and media parts without a reference become
    media parts with `ref=None`."""
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
            ref = next((part[key] for key in ("path", kind, "url") if part.get(key) is not None), None)
            if isinstance(ref, dict) and "url" in ref:  # {"type": "image_url", "image_url": {"url": ...}}
                ref = ref["url"]
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


def _listed(record: dict, kind: str) -> list:
    """The record's top-level media of `kind` ("image" / "images", "video" / "videos"). A list under an image key
    is several images; under a video key, a list of paths or of lists is several videos, any other list is one
    video given as its frames."""
    value = next((record[key] for key in (kind, f"{kind}s") if record.get(key) is not None), [])
    if not isinstance(value, list):
        return [value]
    several = (
        kind == "image" or all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value)
    )
    return value if several else [value]


def _fill_placeholders(record: dict, messages: list[dict]) -> None:
    """Give the placeholder parts their paths from the record's top-level "image(s)" / "video(s)"."""
    listed = {"image": _listed(record, "image"), "video": _listed(record, "video")}
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


def _resolve_media(ref: Any, kind: str, media_root: Path) -> MediaSource:
    if isinstance(ref, dict) and (
        "bytes" in ref or "path" in ref
    ):  # a `datasets` Image / Video with decode=False
        ref = ref["bytes"] if ref.get("bytes") else ref.get("path")
    if isinstance(ref, bytes) or (isinstance(ref, Image.Image) and kind == "image"):
        return ref
    if isinstance(ref, list) and kind == "video":
        if not ref:
            raise BadSample("bad_record", "a video given as a list of frames has no frame")
        return [_resolve_media(frame, "image", media_root) for frame in ref]
    if not isinstance(ref, str):
        raise BadSample(
            "bad_record",
            f"{kind} {ref!r:.80} is not a file path, encoded bytes"
            + (" or a list of frames" if kind == "video" else " or a PIL image"),
        )
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
