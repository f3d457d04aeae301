"""Synthetic chat data that a tiny model can learn: for tests, examples and loss-goes-down demonstrations.

Image questions ask for the colour or the corner of a square in a generated PNG; text questions ask for a
small sum or to repeat a short word. Answers are short and fully determined by the question.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
RECORD_FORMATS = ("llava", "messages")


def square_image(colour: str, corner: str, size: int = 56) -> Image.Image:
    """A grey image with a `colour` square filling its `corner` quarter."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    half = size // 2
    left = half if corner.endswith("right") else 0
    top = half if corner.startswith("bottom") else 0
    image.paste(COLOURS[colour], (left, top, left + half, top + half))
    return image


def synthetic_conversations(num_samples: int, seed: int = 0, with_images: bool = True) -> list[dict]:
    """Conversations as {"image": (colour, corner) or None, "turns": [(question, answer), ...]}; half of them
    about an image when `with_images`, the rest text-only (a quarter of those with two exchanges)."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(num_samples):
        if with_images and rng.random() < 0.5:
            colour, corner = rng.choice(list(COLOURS)), rng.choice(CORNERS)
            question, answer = rng.choice(
                [("What colour is the square?", colour), ("Where is the square?", corner)]
            )
            conversations.append(
                {"image": (colour, corner), "turns": [(question, answer.capitalize() + ".")]}
            )
            continue
        turns = [_text_exchange(rng) for _ in range(2 if rng.random() < 0.25 else 1)]
        conversations.append({"image": None, "turns": turns})
    return conversations


def _text_exchange(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", str(a + b)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    return f"Repeat: {word}", word


def write_synthetic_chat_data(
    path: str | Path,
    num_samples: int,
    seed: int = 0,
    *,
    image_dir: str | Path | None = None,
    with_images: bool = True,
    image_size: int = 56,
    record_format: str = "llava",
) -> Path:
    """Write `num_samples` synthetic conversations to the JSONL file `path` and return it.

    Images (one PNG per colour and corner, `image_size` pixels square) go to `image_dir` (default: an
    `images` directory beside `path`) and are referenced relative to the file's directory, the default
    `media_root`. `record_format`: "llava" ({"image", "conversations": [{"from", "value"}]}, `<image>`
    placeholder) or "messages" ({"messages": [{"role", "content": [parts]}]}).
    """
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record_format={record_format!r}; expected one of {', '.join(RECORD_FORMATS)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    with path.open("w") as file:
        for index, conversation in enumerate(synthetic_conversations(num_samples, seed, with_images)):
            image = None
            if conversation["image"] is not None:
                colour, corner = conversation["image"]
                image_path = image_dir / f"{colour}_{corner.replace(' ', '_')}_{image_size}.png"
                if not image_path.exists():
                    image_dir.mkdir(parents=True, exist_ok=True)
                    square_image(colour, corner, image_size).save(image_path)
                image = os.path.relpath(image_path, path.parent)
            record = _record(index, image, conversation["turns"], record_format)
            file.write(json.dumps(record) + "\n")
    return path


def _record(index: int, image: str | None, turns: list[tuple[str, str]], record_format: str) -> dict:
    if record_format == "llava":
        conversation = []
        for turn, (question, answer) in enumerate(turns):
            prefix = "<image>\n" if image is not None and turn == 0 else ""
            conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        return {"id": index, **({"image": image} if image is not None else {}), "conversations": conversation}
    messages = []
    for turn, (question, answer) in enumerate(turns):
        content = [{"type": "text", "text": question}]
        if image is not None and turn == 0:
            content.insert(0, {"type": "image", "image": image})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"id": index, "messages": messages}
