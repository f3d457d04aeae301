"""Reading media files, one way for training, the CLI and streaming: images upright and in RGB, PyAV for video."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


def load_image(path: str | Path) -> Image.Image:
    """An RGB image upright as its EXIF orientation says, transparency composited on white, fully decoded (a
    truncated file fails here, not later in the processor). Unreadable files raise ValueError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image {str(path)!r} does not exist.")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some broken headers
        raise ValueError(
            f"Image {str(path)!r} cannot be read ({error}); give a complete PNG, JPEG, WebP or other image file."
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
