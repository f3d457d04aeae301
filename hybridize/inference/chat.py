"""Chat-style generation with a (hybrid) model and its processor: text prompt, optional images or video."""

from __future__ import annotations

import torch
from PIL import Image


def chat_inputs(
    processor,
    prompts: list[str],
    images: list[list[Image.Image]] | None = None,
    videos: list[list | None] | None = None,
) -> dict:
    """Model inputs for a batch of one-turn user chats, left-padded for generation: each prompt after its images
    (PIL) and its video (a list of frames, or None)."""
    images = images or [[] for _ in prompts]
    videos = videos or [None for _ in prompts]
    if not len(images) == len(videos) == len(prompts):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(images)} image lists and {len(videos)} videos."
        )
    clips = [video for video in videos if video]
    if clips and not hasattr(processor, "video_processor"):
        raise ValueError(
            "This model's processor has no video processor; it cannot answer questions on videos."
        )
    texts = []
    for prompt, prompt_images, video in zip(prompts, images, videos, strict=True):
        content = [{"type": "image"} for _ in prompt_images] + ([{"type": "video"}] if video else [])
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    media = {"images": [image for prompt_images in images for image in prompt_images], "videos": clips}
    media = {kind: items for kind, items in media.items() if items}
    return dict(processor(text=texts, **media, return_tensors="pt", padding=True))


@torch.no_grad()
def generate_reply(
    model,
    processor,
    prompt: str,
    images: list[Image.Image] | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    static_decode: bool = False,
    fuse: bool = False,
    streamer=None,
) -> str:
    """Generate the model's answer to one prompt (greedy by default) and decode it. `static_decode`: over a
    static hybrid cache with the decode step captured in a CUDA graph on CUDA (`inference.decode.generate_fast`),
    the same tokens as generate(); `fuse`: with its projections fused (`StaticDecoder`). `streamer`: a
    transformers streamer (e.g. `TextStreamer`) that gets the new tokens as they come."""
    inputs = chat_inputs(processor, [prompt], [images or []])
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    if static_decode:
        from hybridize.inference.decode import generate_fast

        output = generate_fast(
            model, **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, fuse=fuse, streamer=streamer
        )
    else:
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
