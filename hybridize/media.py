"""Reading media files, one way for training, the CLI and streaming: images upright and in RGB, PyAV for video."""

from __future__ import annotations

import io
from pathlib import Path

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
