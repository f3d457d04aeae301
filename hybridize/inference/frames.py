"""One video frame as a streaming session sees it: its tokens in the chat template and their M-RoPE positions
(`build_frame_prompt`), and its pixels -> ViT -> token embeddings (`FrameEncoder`).

Token layout: what the model's chat template renders for one user turn that holds the frames as images and
then the question, so a session asked after N frames sees exactly the prompt `generate()` would get:

    <|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>user\\n      prefix, prefilled by reset()
    <|vision_start|><|image_pad|> x N<|vision_end|>                       per frame (N = 256 at 448x448)
    {question}<|im_end|>\\n<|im_start|>assistant\\n                        per question, on a branch

Qwen2.5-VL's chat format has no text timestamps; time enters through M-RoPE. Each frame is one image (a
single-frame video gets the same positions), so its positions are those the model's `get_rope_index` gives the
whole sequence: the vision tokens share one temporal index, height/width indices count up from it, and the
next token starts after the largest (18 positions per 448x448 frame). Temporal indices thus increase frame by
frame.

With `use_graph` (a session's `cuda_graphs`), the frame encoder is captured in a CUDA graph on the first frame;
a capture that fails falls back to eager with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hybridize.compat import configured_attention, is_qwen2_5_vision, qwen2_5_vision_index_tensors
from hybridize.inference.cuda_graphs import capture_cuda_graph, compile_options
from hybridize.inference.vision_attention import BlockDiagonalMasks, packed_attention_on
from hybridize.mixers.ops.flash import flash_kernel_usable

QUESTION_MARKER = "\x00question\x00"  # stands in for the question while the chat template is split


@dataclass(frozen=True)
class FramePrompt:
    """The token pieces of a stream and the M-RoPE positions of one frame relative to its first token."""

    prefix_ids: list[int]  # system turn and the start of the user turn
    frame_ids: torch.Tensor  # (L,) <|vision_start|> <|image_pad|> * N <|vision_end|>
    vision_tokens: slice  # where the N vision features go in frame_ids
    frame_positions: torch.Tensor  # (3, L) M-RoPE positions, the frame's first token at 0
    frame_span: int  # positions one frame advances the stream
    suffix: str  # closes the user turn and opens the assistant's


def build_frame_prompt(model, processor, grid_thw: torch.Tensor, system_prompt: str | None) -> FramePrompt:
    """Split the chat template around one image and a question; frame positions from the model's get_rope_index."""
    tokenizer = getattr(processor, "tokenizer", processor)
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]

    def render(content: list[dict]) -> str:
        messages = [*system, {"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    question = {"type": "text", "text": QUESTION_MARKER}
    prefix, suffix = render([question]).split(QUESTION_MARKER)
    with_image = render([{"type": "image"}, question]).split(QUESTION_MARKER)[0]
    if not with_image.startswith(prefix):
        raise ValueError("The chat template puts an image somewhere other than the start of the user turn.")
    frame_text = with_image[len(prefix) :]

    image_token_id = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    num_vision_tokens = int(grid_thw.prod()) // merge**2
    text_ids = tokenizer(frame_text, add_special_tokens=False)["input_ids"]
    if text_ids.count(image_token_id) != 1:
        raise ValueError(
            f"The chat template renders an image as {frame_text!r}, which holds {text_ids.count(image_token_id)} "
            f"image tokens (id {image_token_id}); expected one placeholder."
        )
    first = text_ids.index(image_token_id)
    frame_ids = text_ids[:first] + [image_token_id] * num_vision_tokens + text_ids[first + 1 :]
    frame_ids = torch.tensor(frame_ids)
    token_types = (frame_ids == image_token_id).long()  # 0 text, 1 image
    positions, _ = model.model.get_rope_index(
        frame_ids[None], mm_token_type_ids=token_types[None], image_grid_thw=grid_thw
    )
    positions = positions[:, 0]  # (3, L)
    return FramePrompt(
        prefix_ids=tokenizer(prefix, add_special_tokens=False)["input_ids"],
        frame_ids=frame_ids,
        vision_tokens=slice(first, first + num_vision_tokens),
        frame_positions=positions,
        frame_span=int(positions.max()) + 1,
        suffix=suffix,
    )


def text_positions(start: int, length: int, device) -> torch.Tensor:
    """(3, 1, length) M-RoPE positions of text tokens: the same index on every axis."""
    return torch.arange(start, start + length, device=device).view(1, 1, -1).expand(3, 1, -1)


def frame_tensor(frame) -> torch.Tensor:
    """A PIL image, an (H, W, 3) uint8 array or tensor -> (H, W, 3) uint8 tensor."""
    if isinstance(frame, Image.Image):
        frame = np.array(frame.convert("RGB"))
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame))
    if not isinstance(frame, torch.Tensor):
        raise TypeError(f"A frame must be a PIL image, numpy array or tensor, got {type(frame).__name__}.")
    if frame.dim() != 3 or frame.shape[-1] != 3 or frame.dtype != torch.uint8:
        raise ValueError(
            f"A frame must be (height, width, 3) uint8 RGB, got shape {tuple(frame.shape)} and {frame.dtype}."
        )
    return frame


def parse_frame_size(frame_size: int | tuple[int, int], factor: int) -> tuple[int, int]:
    """448 or (448, 448) -> (height, width), both multiples of the ViT's patch x merge size."""
    height, width = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
    if not all(isinstance(side, int) and side > 0 and side % factor == 0 for side in (height, width)):
        raise ValueError(
            f"frame_size {frame_size!r} must be positive multiples of {factor} (the ViT's patch size times its "
            f"merge size), e.g. {16 * factor} for {16 * 16} tokens per frame."
        )
    return height, width


class FrameEncoder:
    """One frame of the configured size -> the (1, L, hidden) input embeddings of its tokens.

    Pixels are rescaled, normalised and cut into patches as the model's image processor does (bit for bit on a
    frame of the configured size; other sizes are resized on the device first, bicubic), the ViT runs with its
    grid-dependent index tensors computed once, and the vision features are placed between the frame's
    <|vision_start|>/<|vision_end|> embeddings. `use_graph` replays all of it from a CUDA graph.

    `packed_attention` (default on): a Qwen2.5-VL vision tower under SDPA runs each layer's attention as one
    call over all windows (`hybridize.inference.vision_attention`): PyTorch's varlen flash kernel where it runs,
    else SDPA with a block-diagonal mask built once per frame size, rather than one call per window; its config
    names the packed attention only while a frame is encoded.
    Other attention implementations (a real flash one included) are left as they are.
    `compile`: each vision block through torch.compile (fuses the norms, rotary and MLP elementwise kernels);
    True or a mode of `hybridize.inference.cuda_graphs.COMPILE_MODES`.
    """

    def __init__(
        self,
        model,
        processor,
        prompt: FramePrompt,
        size: tuple[int, int],
        use_graph: bool,
        packed_attention: bool = True,
        compile: bool | str = False,
    ):
        compile_kwargs = compile_options(compile)
        vision_config = model.config.vision_config
        image_processor = processor.image_processor
        visual = model.model.visual
        self.model, self.size, self.use_graph = model, size, use_graph
        self.patch, self.merge = vision_config.patch_size, vision_config.spatial_merge_size
        self.temporal = vision_config.temporal_patch_size
        device = model.device
        self.rescale = image_processor.rescale_factor if image_processor.do_rescale else None
        self.mean = self.std = None
        if image_processor.do_normalize:  # (3, 1, 1) per channel
            self.mean, self.std = (
                torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)
                for values in (image_processor.image_mean, image_processor.image_std)
            )
        self.grid_thw = torch.tensor([[1, size[0] // self.patch, size[1] // self.patch]], device=device)
        self.packed_attention = (
            packed_attention and is_qwen2_5_vision(visual) and configured_attention(visual.config) == "sdpa"
        )
        self.vision_kwargs = qwen2_5_vision_index_tensors(
            visual, self.grid_thw, varlen=True if self.packed_attention else None
        )
        if self.packed_attention:
            head_dim = vision_config.hidden_size // vision_config.num_heads
            flash = flash_kernel_usable(device, visual.dtype, head_dim)
            self.vision_kwargs["block_diagonal_masks"] = BlockDiagonalMasks(flash=flash)
        if compile_kwargs is not None and hasattr(visual, "blocks"):
            for block in visual.blocks:  # one shape per frame size; the blocks share their compiled graph
                block.compile(dynamic=False, **compile_kwargs)
        embeddings = model.get_input_embeddings()(prompt.frame_ids.to(device))  # (L, hidden)
        self.before = embeddings[: prompt.vision_tokens.start]
        self.after = embeddings[prompt.vision_tokens.stop :]
        self.graph: torch.cuda.CUDAGraph | None = None

    def prepare(self, frame) -> torch.Tensor:
        """(3, H, W) float32 pixel values 0..255 on the model's device, at the configured size."""
        pixels = frame_tensor(frame).to(self.model.device, non_blocking=True).permute(2, 0, 1).float()
        if tuple(pixels.shape[1:]) != self.size:
            pixels = F.interpolate(pixels[None], size=self.size, mode="bicubic", antialias=True)[0]
            pixels = pixels.round().clamp(0, 255)  # as a uint8 frame of this size would hold
        return pixels

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (h * w, 3 * temporal * patch * patch) rows in the image processor's order."""
        if self.rescale is not None:
            pixels = (pixels.double() * self.rescale).float()  # the processor rescales in float64
        if self.mean is not None:
            pixels = (pixels - self.mean) / self.std
        channels, p, m, t = 3, self.patch, self.merge, self.temporal
        grid_h, grid_w = self.size[0] // p, self.size[1] // p
        # A still image fills every temporal slot of a patch: (t, 3, H, W), then merge blocks of m x m patches.
        pixels = pixels[None].expand(t, -1, -1, -1)
        pixels = pixels.reshape(t, channels, grid_h // m, m, p, grid_w // m, m, p)
        pixels = pixels.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (h/m, w/m, m, m, 3, t, p, p)
        return pixels.reshape(grid_h * grid_w, channels * t * p * p)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.model.visual
        rows = self.patches(pixels).to(visual.dtype)
        attention = packed_attention_on(visual.config) if self.packed_attention else contextlib.nullcontext()
        with attention:
            features = visual(rows, grid_thw=self.grid_thw, **self.vision_kwargs).pooler_output
        return torch.cat([self.before, features.to(self.before.dtype), self.after])[None]

    def __call__(self, frame) -> torch.Tensor:
        """The frame's token embeddings; from the graph, a buffer that the next frame overwrites."""
        pixels = self.prepare(frame)
        if not self.use_graph:
            return self.encode(pixels)
        if self.graph is None:
            try:
                self.input = pixels.clone()
                self.graph, self.output = capture_cuda_graph(lambda: self.encode(self.input))
            except Exception as error:  # a capture can fail in many ways; eager always works
                warnings.warn(
                    f"CUDA graph capture of the frame encoder failed ({error}); running it eagerly.",
                    stacklevel=3,
                )
                self.use_graph, self.graph = False, None
                return self.encode(pixels)
        self.input.copy_(pixels)
        self.graph.replay()
        return self.output
