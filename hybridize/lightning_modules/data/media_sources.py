"""Media as records give them (a file, encoded bytes, a decoded image, a video's frames) -> sizes from headers,
decoded RGB images and sampled video frames. Files and videos are read by `hybridize.media`."""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hybridize.lightning_modules.data.formats import BadSample, MediaSource
from hybridize.media import decode_video, load_image, read_video_header

UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError)  # PIL raises SyntaxError for some broken headers


def describe(source: MediaSource) -> str:
    """How a medium is named in messages: its path, or what it is when it lives in the record."""
    if isinstance(source, Path):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} embedded bytes>"
    if isinstance(source, list):
        return f"<{len(source)} frames>"
    return f"<{source.width}x{source.height} {source.mode} image>"


def image_size(source: MediaSource) -> tuple[int, int]:
    """(height, width) of the upright image, read from the header only."""
    if isinstance(source, Image.Image):
        return source.height, source.width
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
                width, height = height, width
    except UNREADABLE_IMAGE as error:
        raise BadSample("unreadable_media", f"cannot read image {describe(source)}: {error}") from None
    return height, width


def decode_image(source: MediaSource) -> Image.Image:
    """The medium as an upright RGB image (`hybridize.media.load_image`: files, bytes and decoded images)."""
    try:
        return load_image(source)
    except (*UNREADABLE_IMAGE, FileNotFoundError) as error:
        raise BadSample("unreadable_media", f"cannot decode image {describe(source)}: {error}") from None


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video to decode, read from the container header (or the frame list)."""

    frame_indices: tuple[int, ...]  # evenly spaced over the video; repeats when it has too few frames
    height: int
    width: int
    seconds_per_grid: float  # seconds covered by one temporal patch (Qwen2.5-VL's second_per_grid_ts)


def _sampled(total: int, wanted: int, temporal_patch_size: int) -> np.ndarray:
    """`wanted` frames rounded down to whole temporal patches (at least one), evenly spaced over `total`."""
    count = max(wanted // temporal_patch_size * temporal_patch_size, temporal_patch_size)
    return np.linspace(0, total - 1, count).round().astype(int)


def plan_video(source: MediaSource, fps: float, max_frames: int, temporal_patch_size: int) -> VideoPlan:
    """Sample `fps` frames per second, at most `max_frames`, a multiple of `temporal_patch_size`. A video given as
    frames is taken as already sampled at `fps`."""
    if isinstance(source, list):
        height, width = image_size(source[0])
        indices = _sampled(len(source), min(len(source), max_frames), temporal_patch_size)
        return VideoPlan(tuple(indices.tolist()), height, width, temporal_patch_size / fps)
    try:
        header = read_video_header(source)
    except ValueError as error:
        raise BadSample("unreadable_media", str(error)) from None
    total, rate, height, width = header.frame_count, header.frame_rate, header.height, header.width
    if not total or not rate or not height:
        raise BadSample(
            "unreadable_media",
            f"video {describe(source)} has no frame count, frame rate or size in its header",
        )
    seconds = total / rate
    indices = _sampled(total, min(math.floor(seconds * fps), max_frames), temporal_patch_size)
    return VideoPlan(tuple(indices.tolist()), height, width, temporal_patch_size * seconds / len(indices))


def decode_frames(source: MediaSource, frame_indices: tuple[int, ...]) -> list[Image.Image]:
    """The frames at `frame_indices` as RGB images; indices past the decodable end repeat the last frame."""
    if isinstance(source, list):
        return [decode_image(source[i]) for i in frame_indices]
    wanted, frames = set(frame_indices), {}
    try:
        for index, (_, frame) in enumerate(decode_video(source)):
            if index in wanted:
                frames[index] = frame.to_image()
            if index >= frame_indices[-1]:
                break
    except ValueError as error:
        raise BadSample("unreadable_media", str(error)) from None
    if not frames:
        raise BadSample("unreadable_media", f"video {describe(source)} has no decodable frames")
    decoded = sorted(frames)
    return [frames[decoded[max(bisect.bisect_right(decoded, i) - 1, 0)]] for i in frame_indices]
