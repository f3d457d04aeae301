"""Chat messages -> token ids, labels (assistant replies only) and vision tensors, with a model's processor.

`ChatEncoder` renders a conversation with the model's chat template, finds the assistant replies for labels and
lays out images and videos as the processor does (videos in Qwen2-VL's layout); `measure` checks and sizes a
sample from text and media headers, `encode_sample` builds it with decoded media, cut to its measured length.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hybridize.compat import (
    has_image_token_counter,
    num_image_tokens,
    qwen2_vl_smart_resize,
    returns_mm_token_type_ids,
)
from hybridize.lightning_modules.data.formats import BadSample, MediaSource
from hybridize.lightning_modules.data.media_sources import (
    VideoPlan,
    decode_frames,
    decode_image,
    image_size,
    plan_video,
)

IGNORE_INDEX = -100
ON_TOO_LONG = ("truncate", "skip", "error")
ON_BAD_SAMPLE = ("skip", "error")
# Tokens the Qwen-VL templates wrap around each image / video; truncation keeps or drops them with it.
VISION_WRAPPERS = ("<|vision_start|>", "<|vision_end|>")
# Reasons that depend on max_length / on_too_long rather than on the record being broken.
LENGTH_REASONS = ("too_long", "no_labels_after_truncation")


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
        self, messages: list[dict], media: list[tuple[str, MediaSource]], counts: list[int]
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

    def check_media(self, media: list[tuple[str, MediaSource]]) -> None:
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

    def media_token_counts(self, media: list[tuple[str, MediaSource]]) -> list[int]:
        """Tokens of each medium, from file headers only (no decoding)."""
        counts = []
        for kind, source in media:
            if kind == "video":
                counts.append(self._video_grid(self.plan_video(source))[1])
            elif self.counts_from_sizes:
                counts.append(self._image_token_count(*image_size(source)))
            else:
                counts.append(self._load_images([source])[0][0])
        return counts

    def media_tensors(
        self, media: list[tuple[str, MediaSource]], images: int, videos: int
    ) -> tuple[list[int], dict]:
        """Vision tensors of the first `images` images and `videos` videos, and every medium's token count
        (1 for the media left out, which truncation drops)."""
        seen, kept = Counter(), []
        for kind, _ in media:
            kept.append(seen[kind] < (images if kind == "image" else videos))
            seen[kind] += 1
        kept_media = [medium for medium, keep in zip(media, kept, strict=True) if keep]
        image_sources = [source for kind, source in kept_media if kind == "image"]
        video_sources = [source for kind, source in kept_media if kind == "video"]
        image_counts, tensors = self._load_images(image_sources) if image_sources else ([], {})
        video_counts = []
        if video_sources:
            rows, grids, seconds = [], [], []
            for source in video_sources:
                plan = self.plan_video(source)
                pixel_rows, grid = self._video_patches(decode_frames(source, plan.frame_indices))
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

    def _load_images(self, sources: list[MediaSource]) -> tuple[list[int], dict]:
        images = [decode_image(source) for source in sources]
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

    def plan_video(self, source: MediaSource) -> VideoPlan:
        return plan_video(
            source, self.video_fps, self.video_max_frames, self.image_processor.temporal_patch_size
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
class Measured:
    """What a sample is, learnt from its text and media headers without decoding media."""

    length: int = 0  # tokens kept (after truncation)
    full_length: int = 0
    images: int = 0  # media kept
    videos: int = 0
    reason: str | None = None
    detail: str = ""


def measure(
    encoder: ChatEncoder,
    messages: list[dict],
    media: list[tuple[str, MediaSource]],
    max_length: int,
    on_too_long: str,
) -> Measured:
    """A normalised record checked and measured: `reason` is set (a `BadSample` reason) when it cannot be used as
    it is, for a broken record or for its length (`too_long` unless truncated, no labels left)."""
    try:
        encoder.check_media(media)
        tokens = encoder.tokenize(messages, media, encoder.media_token_counts(media))
    except BadSample as error:
        return Measured(reason=error.reason, detail=error.detail)
    full = len(tokens.input_ids)
    length = truncation_length(tokens.spans, full, max_length)
    kept = Counter(span.kind for span in tokens.spans if span.end <= length)
    measured = Measured(length, full, kept["image"], kept["video"])
    if full > max_length and on_too_long != "truncate":
        measured.reason, measured.detail = "too_long", f"{full} tokens"
    elif all(label == IGNORE_INDEX for label in tokens.labels[:length]):
        truncated = length < full
        measured.reason = "no_labels_after_truncation" if truncated else "no_labels"
        measured.detail = (
            f"{full} tokens, none of the first {length} is an assistant token"
            if truncated
            else "the chat template rendered no assistant text"
        )
    return measured


def encode_sample(
    encoder: ChatEncoder, messages: list[dict], media: list[tuple[str, MediaSource]], measured: Measured
) -> dict[str, torch.Tensor]:
    """A measured record as a training sample: media decoded, cut to its measured length (see `ChatEncoder.sample`)."""
    counts, tensors = encoder.media_tensors(media, measured.images, measured.videos)
    tokens = encoder.tokenize(messages, media, counts)
    return encoder.sample(tokens, tensors, measured.length)
