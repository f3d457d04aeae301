"""Chat-style generation with a (hybrid) model and its processor: text prompt, optional images."""

from __future__ import annotations

import torch
from PIL import Image

from hybridize.converters.discovery import rotary_kind


def chat_inputs(processor, prompts: list[str], images: list[list[Image.Image]] | None = None) -> dict:
    """Model inputs for a batch of one-turn user chats, left-padded for generation."""
    images = images or [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(images)} image lists.")
    texts = []
    for prompt, prompt_images in zip(prompts, images, strict=True):
        content = [{"type": "image"} for _ in prompt_images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    flat_images = [image for prompt_images in images for image in prompt_images]
    if flat_images:
        return dict(processor(text=texts, images=flat_images, return_tensors="pt", padding=True))
    return dict(processor(text=texts, return_tensors="pt", padding=True))


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
    streamer=None,
) -> str:
    """Generate the model's answer to one prompt (greedy by default) and decode it. `static_decode`: over a
    static hybrid cache with the decode step captured in a CUDA graph on CUDA (`inference.decode.generate_fast`),
    the same tokens as generate(). `streamer`: a transformers streamer (e.g. `TextStreamer`) that gets the new
    tokens as they come."""
    inputs = chat_inputs(processor, [prompt], [images or []])
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    if static_decode:
        from hybridize.inference.decode import generate_fast

        output = generate_fast(
            model, **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer
        )
    else:
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0]


@torch.inference_mode()
def greedy_decode_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding that reruns the whole sequence at every step with no cache: the slow, obviously
    correct reference that `generate()` with the hybrid cache must reproduce token for token. Stops as
    generate() does: a row that emits an end-of-sequence token gets the pad token after it, and the loop
    ends when every row has."""
    inputs = dict(inputs)
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=inputs["input_ids"].device)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0].item() if len(eos) else 0)
    finished = torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.bool, device=eos.device)
    # 1-D RoPE models get generate()'s padding-aware positions (M-RoPE models derive theirs from the mask).
    # RoPE is relative, but its tables are fp32: other absolute positions would move logits by ~1e-7.
    padding_aware_positions = rotary_kind(model.config.get_text_config(decoder=True)) == "rope"
    for _ in range(steps):
        if padding_aware_positions:
            mask = inputs["attention_mask"].long()
            inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        token = model(**inputs, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        token = token.masked_fill(finished, pad)
        finished = finished | torch.isin(token, eos)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        if "mm_token_type_ids" in inputs:  # appended tokens are text (type 0)
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(token)], dim=1
            )
        if finished.all():
            break
    return inputs["input_ids"]
