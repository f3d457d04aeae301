"""Streaming video: a (hybrid) Qwen2.5-VL takes frames one at a time in constant memory and answers questions
at any time (`StreamingSession`).

A session encodes each frame (`hybridize.inference.frames`: its tokens in the chat template, pixels -> ViT ->
token embeddings) and prefills it into the stream's state (`hybridize.inference.stream_state`: a static cache
written in place, its per-frame prefill replayed from CUDA graphs). A question is answered on that state, which is
put back after the answer (only what the answer overwrote is copied back), or on a copy of a growing cache:
answers never enter the stream's context.

CUDA graphs (`cuda_graphs=True`, the default on CUDA): the frame encoder is captured on the first frame, the
per-frame prefill at the second (see `stream_state`), the answer's one-token step by the `StaticDecoder` at the
first question (`StaticAnswers`). A capture that fails falls back to eager with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch

from hybridize.compat import configured_attention, generation_logits_processors
from hybridize.inference.cuda_graphs import compile_options
from hybridize.inference.decode import SUPPORTED_ATTENTION, StaticDecoder
from hybridize.inference.frames import FrameEncoder, build_frame_prompt, parse_frame_size, text_positions
from hybridize.inference.fusion import fuse_projections
from hybridize.inference.sampling import choose_next_tokens
from hybridize.inference.static_cache import StaticHybridCache
from hybridize.inference.stream_state import CapturedPrefill, StreamState, growing_layers


class StaticAnswers:
    """Answers decoded on a static-cache stream's own `StaticHybridCache` by a `StaticDecoder` (its one-token
    step a CUDA graph on CUDA, captured over the cache's buffers at the first question and replayed at every
    later one). The caller puts the stream back after the answer (`StreamState.saved_for_answer`)."""

    def __init__(self, model, cache: StaticHybridCache):
        self.cache = cache
        self.decoder = StaticDecoder(model, cache)

    def start(
        self, state: StreamState, token_ids: list[int]
    ) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
        """Prefill the question after the stream's tokens: the next (1, vocab) fp32 logits, and the step function."""
        device = self.cache.device
        ids = torch.tensor([token_ids], device=device)
        logits = self.decoder.prefill(
            ids, position_ids=text_positions(state.position, len(token_ids), device)
        )
        return logits.float(), self.step

    def step(self, token_id: int) -> torch.Tensor:
        return self.decoder.step(torch.tensor([token_id], device=self.cache.device)).float()


class EncoderStream:
    """The side stream of `StreamingSession(overlap_encoder=True)` and the two events that order it: `read`, on
    the prefill's stream once a frame's embeddings are copied into the prefill's inputs (the next encoding
    overwrites them), and `ready`, on the side stream once a frame is encoded."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.read, self.ready = torch.cuda.Event(), torch.cuda.Event()

    def encode(self, encoder: FrameEncoder, frame) -> torch.Tensor:
        current = torch.cuda.current_stream(self.stream.device)
        if isinstance(frame, torch.Tensor) and frame.is_cuda:
            self.stream.wait_stream(current)  # the frame may be the output of work queued before
        self.stream.wait_event(self.read)
        with torch.cuda.stream(self.stream):
            embeds = encoder(frame)
            self.ready.record()
        current.wait_event(self.ready)
        return embeds


class StreamingSession:
    """Feed video frames one at a time into a (hybrid) Qwen2.5-VL in constant memory; ask questions any time.

        session = StreamingSession(model, processor, frame_size=448)
        for frame in frames:            # PIL images, (H, W, 3) uint8 arrays or tensors
            session.add_frame(frame)
            if ...:
                print(session.ask("What just happened?", max_new_tokens=64))

    frame_size: 448 or (height, width), multiples of the ViT's patch x merge size (28 for Qwen2.5-VL); frames
    of another size are resized on the device. system_prompt: None keeps the chat template's default.
    cuda_graphs: capture the frame encoder and the per-frame prefill in CUDA graphs (default: on CUDA).
    static_decode: decode answers with a `hybridize.inference.decode.StaticDecoder` over the stream's static cache
    (its decode step a CUDA graph on CUDA) instead of one forward per token (default: on CUDA, for models without
    growing layers and with SDPA or eager attention, which stream into a static cache).
    allow_growing_cache: stream into a model with full-attention layers, whose cache grows with every frame.
    compile: torch.compile the vision blocks and the captured per-frame prefill (CUDA graphs only; the first
    frames compile, about a minute for Qwen2.5-VL-3B); True or a mode of
    `hybridize.inference.cuda_graphs.COMPILE_MODES` ("max-autotune-no-cudagraphs": minutes more, tuned matrix
    products). The model's vision blocks stay compiled after the session
    (`hybridize.inference.fusion.restore_model(model)` undoes it, and `fuse`).
    fuse: `hybridize.inference.fusion.fuse_projections(model)` first (sibling projections of the mixers and the
    gated MLPs, ViT included, as one matrix product each; the model computes the same; the caller's parameters
    become views of the fused weights until `unfuse_projections(model)`). Off unless asked for.
    overlap_encoder: once the encoder and the prefill are captured, encode each frame on a second CUDA stream,
    so that its ViT runs beside the previous frame's prefill (both leave much of the GPU idle: a frame's 258
    rows are few for the matrix products, a Gated DeltaNet chunk kernel runs a program per head and chunk). Each
    frame waits for its own encoding, each encoding for the previous frame's embeddings to be read: the stream's
    state is the same. A frame already on the GPU is encoded after the work queued before it (no overlap), since
    it may be that work's output. Default: with cuda_graphs (12.75 against 13.18 ms per frame for the compiled
    Qwen2.5-VL-3B hybrid on an H100, benchmarks/README.md); True needs cuda_graphs.
    """

    @torch.no_grad()  # not inference mode: its tensors stay usable wherever the caller runs the encoder
    def __init__(
        self,
        model,
        processor,
        *,
        frame_size: int | tuple[int, int] = 448,
        system_prompt: str | None = None,
        cuda_graphs: bool | None = None,
        static_decode: bool | None = None,
        allow_growing_cache: bool = False,
        fuse: bool = False,
        compile: bool | str = False,
        overlap_encoder: bool | None = None,
    ):
        compile_options(compile)  # a mode it does not know is refused before any work
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("visual", "get_rope_index")):
            raise ValueError(
                f"StreamingSession needs a Qwen2.5-VL-family model (a vision tower `model.visual` and M-RoPE "
                f"`model.get_rope_index`); {type(model).__name__} has not."
            )
        self.model = model.eval()
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.growing = growing_layers(model)
        if self.growing and not allow_growing_cache:
            layers = ", ".join(f"{idx}: {why}" for idx, why in self.growing.items())
            raise ValueError(
                f"The model's cache would grow with every frame (layers {layers}). Stream into a hybrid with "
                "sliding-window and linear layers only, or pass allow_growing_cache=True."
            )
        vision_config = model.config.vision_config
        factor = vision_config.patch_size * vision_config.spatial_merge_size
        self.frame_size = parse_frame_size(frame_size, factor)
        patches = [side // vision_config.patch_size for side in self.frame_size]
        grid_thw = torch.tensor([[1, *patches]])  # one temporal patch of h x w patches
        self.prompt = build_frame_prompt(model, processor, grid_thw, system_prompt)
        device = model.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {device}.")
        self.cuda_graphs = cuda_graphs
        if compile and not cuda_graphs:
            raise ValueError(
                f"compile={compile!r} compiles the CUDA-graph-captured steps; it needs cuda_graphs=True."
            )
        self.compile = compile
        if overlap_encoder is None:
            overlap_encoder = cuda_graphs
        if overlap_encoder and not cuda_graphs:
            raise ValueError(
                "overlap_encoder=True encodes frames on a second CUDA stream beside the captured prefill; it "
                "needs cuda_graphs=True (a model on a CUDA device)."
            )
        self.overlap = EncoderStream(device) if overlap_encoder else None
        self.encoder = FrameEncoder(
            model, processor, self.prompt, self.frame_size, use_graph=cuda_graphs, compile=compile
        )
        # A static cache needs a model without growing layers and an attention implementation whose masks the
        # stream and the static decoder can replace.
        implementation = configured_attention(model.config.get_text_config(decoder=True))
        self.static_cache = not self.growing and implementation in SUPPORTED_ATTENTION
        if static_decode is None:
            static_decode = device.type == "cuda" and self.static_cache
        if static_decode and not self.static_cache:
            raise ValueError(
                "static_decode needs a model without growing layers (its cache has a fixed size) and "
                f"attn_implementation in {SUPPORTED_ATTENTION}, got {implementation!r}."
            )
        self.static_decode = static_decode
        self.static_answers: StaticAnswers | None = None  # built by the first question
        self.frame_positions = self.prompt.frame_positions.to(device)[:, None]  # (3, 1, L)
        if fuse:  # after every input check: it rewrites the model's parameters as views
            fuse_projections(model)
        self.reset()

    @property
    def tokens_per_frame(self) -> int:
        return len(self.prompt.frame_ids)

    @property
    def position(self) -> int:
        """The M-RoPE position the next token gets."""
        return self.state.position

    @torch.inference_mode()
    def reset(self) -> None:
        """Start a new stream: an empty cache with the system turn and the start of the user turn prefilled (a
        static cache keeps its buffers, and the answers' captured step with them)."""
        previous = getattr(self, "state", None)
        self.state = StreamState(
            self.model,
            full_attention_mask=bool(self.growing),
            static=self.static_cache,
            cache=previous.cache if previous is not None and previous.static else None,
        )
        self.state.prefill_text(self.prompt.prefix_ids)
        self.frames = 0
        self.captured: CapturedPrefill | None = None
        # the frame prefill is captured once the cache holds every state (after the first frame)
        self.capture_prefill = self.cuda_graphs and self.static_cache

    @property
    def prefill_graph(self) -> torch.cuda.CUDAGraph | None:
        """The CUDA graph the next frame's prefill replays, if any."""
        return None if self.captured is None else self.captured.graphs[self.captured.phase()][0]

    @torch.inference_mode()
    def add_frame(self, frame) -> None:
        """Encode one frame and prefill its tokens into the stream's state. The work is queued on the GPU and
        not waited for: a frame in pinned host memory must stay unchanged until the GPU has copied it."""
        embeds = self.encode(frame)
        positions = self.frame_positions + self.state.position
        if self.captured is None and self.capture_prefill and self.frames:
            full = self.state.window_full()
            # The graph for full windows is captured now too, though it runs later.
            phases = (None,) if full is None else ((True,) if full else (False, True))
            try:
                self.captured = CapturedPrefill(
                    self.state, embeds, positions, compile=self.compile, phases=phases
                )
            except Exception as error:  # a capture can fail in many ways; eager always works
                warnings.warn(
                    f"CUDA graph capture of the frame prefill failed ({error}); running it eagerly.",
                    stacklevel=2,
                )
                self.capture_prefill = False
        if self.captured is not None:
            self.captured.load(embeds, positions)
            self.embeddings_read()
            self.captured.replay()
            self.state.position += self.prompt.frame_span
        else:
            self.state.prefill(embeds, positions, self.prompt.frame_span)
            self.embeddings_read()
        self.frames += 1

    def encode(self, frame) -> torch.Tensor:
        """The frame's token embeddings, on the encoder's stream under `overlap_encoder` once the encoder and the
        prefill are captured (until then, and for frames already on the GPU, ordered after the work before)."""
        steady = self.encoder.graph is not None and not (self.capture_prefill and self.captured is None)
        if self.overlap is None or not steady:
            return self.encoder(frame)
        return self.overlap.encode(self.encoder, frame)

    def embeddings_read(self) -> None:
        """Mark the point in the current stream after which the encoder may overwrite the frame's embeddings."""
        if self.overlap is not None:
            self.overlap.read.record()

    @torch.inference_mode()
    def next_token_logits(self) -> torch.Tensor:
        """(1, vocab) fp32 logits after the last token prefilled."""
        return self.state.logits()

    @torch.inference_mode()
    def ask_ids(self, question: str, max_new_tokens: int = 64, do_sample: bool = False) -> list[int]:
        """The answer's token ids, up to and including an end-of-sequence token; the stream is left as it was.

        Tokens are chosen as generate() chooses them on the same prompt (`hybridize.inference.sampling`): through
        the logits processors generate() builds from the model's generation config, then the argmax, or with
        do_sample a draw after its warpers (temperature, top-k, top-p, ...). The processors see the prompt's token
        ids (rebuilt for the question, 8 bytes per token of the stream) and the answer so far.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        question_ids = self.tokenizer(question + self.prompt.suffix, add_special_tokens=False)["input_ids"]
        if not self.state.static:  # a copy of the growing cache
            branch = self.state.branch()
            branch.prefill_text(question_ids)
            return self._answer(question_ids, branch.logits(), branch.decode, max_new_tokens, do_sample)
        with self.state.saved_for_answer(len(question_ids) + max_new_tokens) as state:
            if self.static_decode:
                if self.static_answers is None or self.static_answers.cache is not state.cache:
                    self.static_answers = StaticAnswers(self.model, state.cache)
                logits, step = self.static_answers.start(state, question_ids)
            else:
                state.prefill_text(question_ids)
                logits, step = state.logits(), state.decode
            return self._answer(question_ids, logits, step, max_new_tokens, do_sample)

    def _answer(
        self,
        question_ids: list[int],
        logits: torch.Tensor,
        step: Callable[[int], torch.Tensor],
        max_new_tokens: int,
        do_sample: bool,
    ) -> list[int]:
        """The answer's tokens from the question's next-token `logits`, feeding each to `step` for the next."""
        prompt = self.prompt_ids(question_ids).to(logits.device)  # (prompt,)
        sequence = torch.empty(1, len(prompt) + max_new_tokens, dtype=torch.long, device=logits.device)
        sequence[0, : len(prompt)] = prompt
        generation_config = copy.deepcopy(self.model.generation_config)
        generation_config.do_sample = do_sample
        generation_config.max_length = sequence.shape[1]
        processors = generation_logits_processors(self.model, generation_config, len(prompt), logits.device)
        stop = end_of_sequence_ids(self.model.generation_config, self.tokenizer)
        tokens, length = [], len(prompt)
        while True:
            token, _ = choose_next_tokens(processors, sequence[:, :length], logits, do_sample)
            sequence[:, length] = token
            length += 1
            tokens.append(int(token))
            if tokens[-1] in stop or len(tokens) == max_new_tokens:
                return tokens
            logits = step(tokens[-1])

    def prompt_ids(self, question_ids: list[int]) -> torch.Tensor:
        """(prompt,) the token ids of the prompt a question after the frames so far is: the prefix, each frame's
        tokens, the question and the assistant's turn, as generate() would get them."""
        return torch.cat(
            [
                torch.tensor(self.prompt.prefix_ids),
                self.prompt.frame_ids.repeat(self.frames),
                torch.tensor(question_ids),
            ]
        )

    def ask(self, question: str, max_new_tokens: int = 64, do_sample: bool = False) -> str:
        """Answer a question about the frames so far, without disturbing the stream."""
        tokens = self.ask_ids(question, max_new_tokens, do_sample)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def cache_bytes(self) -> int:
        """Bytes of every tensor the stream's state holds (each storage counted once)."""
        storages = {
            tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
            for tensor in self.state.tensors()
        }
        return sum(storages.values())


def end_of_sequence_ids(generation_config, tokenizer) -> set[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set([eos] if isinstance(eos, int) else list(eos or []))
