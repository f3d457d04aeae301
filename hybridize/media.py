"""Reading media files, one way for training, the CLI and streaming: images upright and in RGB, PyAV for video
(the header, the frames in decoding order with their times, frames sampled at a rate)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def upright_rgb(image: Image.Image) -> Image.Image:
    """An image upright as its EXIF orientation says, in RGB, transparency composited on white: the rules every
    image follows, whether training reads it or a user passes it to `generate`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """`upright_rgb` of an image file, its encoded bytes or a decoded image, fully decoded (a truncated file fails
    here, not later in the processor). Unreadable images raise ValueError naming the file."""
    if isinstance(source, Image.Image):
        return upright_rgb(source)
    if isinstance(source, bytes):
        name, opened = f"<{len(source)} bytes>", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Image {str(path)!r} does not exist.")
        name, opened = repr(str(path)), path
    try:
        with Image.open(opened) as image:
            return upright_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some broken headers
        raise ValueError(
            f"Image {name} cannot be read ({error}); give a complete PNG, JPEG, WebP or other image file."
        ) from None


def import_av():
    """PyAV (the `video` extra), or an error that says how to install it."""
    try:
        import av
    except ImportError:
        raise ImportError(
            "Videos are decoded with PyAV, which is not installed: pip install 'hybridize[video]' (or av)."
        ) from None
    return av


@dataclass(frozen=True)
class VideoHeader:
    """What a video's container header says about its first video stream."""

    seconds: float | None  # the stream's duration, else the container's; None when neither is known
    frame_rate: float  # average (else guessed) frames per second; 0 when unknown
    frame_count: int  # from the header, else seconds x frame rate; 0 when unknown
    height: int
    width: int


def _video_name(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else repr(str(source))


def _open_video(av, source: str | Path | bytes):
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))


def read_video_header(source: str | Path | bytes) -> VideoHeader:
    """The header of a video file or its encoded bytes; ValueError naming the video if it cannot be read."""
    av = import_av()
    try:
        with _open_video(av, source) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = None if container.duration is None else container.duration / 1e6
            count = stream.frames or (round(seconds * rate) if seconds and rate else 0)
            height, width = stream.codec_context.height, stream.codec_context.width
    except (av.FFmpegError, IndexError, OSError) as error:
        raise ValueError(f"Cannot read video {_video_name(source)}: {error}") from None
    return VideoHeader(seconds, rate, count, height, width)


def video_duration(path: str | Path | bytes) -> float:
    """Seconds of the first video stream, read from the container header."""
    seconds = read_video_header(path).seconds
    if seconds is None:
        raise ValueError(f"Video {_video_name(path)} has no duration in its header.")
    return seconds


def decode_video(source: str | Path | bytes) -> Iterator[tuple[float, object]]:
    """(seconds from the first frame, PyAV frame) of the first video stream, in decoding order; ValueError naming
    the video where decoding fails."""
    av = import_av()
    try:
        with _open_video(av, source) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start = None
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else index / float(stream.average_rate or 1)
                start = time if start is None else start
                yield time - start, frame
    except (av.FFmpegError, IndexError, OSError) as error:
        raise ValueError(f"Cannot decode video {_video_name(source)}: {error}") from None


def sample_video(path: str | Path | bytes, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    """(seconds from the start, (H, W, 3) uint8 RGB) of the first frame at or after each multiple of 1 / fps;
    a video with fewer frames than that gives each frame once."""
    due = 0.0
    for time, frame in decode_video(path):
        if time + 1e-6 < due:
            continue
        yield time, frame.to_ndarray(format="rgb24")
        due = (math.floor(time * fps + 1e-6) + 1) / fps
