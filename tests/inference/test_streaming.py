"""StreamingSession against one-shot prefill and generate() on the same tokens, its memory, and `hybridize stream`."""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from hybridize.cli import main
from hybridize.compat import configured_attention, output_cache, set_attention_implementation
from hybridize.converters import convert, plan_layers, save_hybrid
from hybridize.inference import stream_state
from hybridize.inference.frames import FrameEncoder, build_frame_prompt
from hybridize.inference.static_cache import StaticHybridCache
from hybridize.inference.streaming import StreamingSession
from hybridize.inference.vision_attention import PACKED_ATTENTION
from hybridize.media import sample_video, video_duration
from hybridize.testing import held_states
from tests.conftest import needs_cuda

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

QUESTION = "What changed?"


def frames(count: int, size: tuple[int, int] = (56, 56), seed: int = 0) -> list[np.ndarray]:
    """(H, W, 3) uint8 frames of random pixels; size is (height, width)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def one_shot_inputs(processor, stream: list[np.ndarray], question: str | None = None) -> dict:
    """Processor inputs for one user turn holding the frames as images, then the question and the assistant
    prefix; without a question, only up to the last frame."""
    content = [{"type": "image"} for _ in stream] + [{"type": "text", "text": question or "?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    if question is None:
        text = text[: text.rindex("?")]
    inputs = dict(processor(text=[text], images=[Image.fromarray(f) for f in stream], return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def stream_of(model, processor, stream, **options) -> StreamingSession:
    session = StreamingSession(model, processor, **options)
    for frame in stream:
        session.add_frame(frame)
    return session


@pytest.fixture(scope="module")
def hybrid64(tiny_teacher):
    """The tiny InfiniteVL layout with window 64 in fp64: the window fills mid-stream and then slides."""
    torch.manual_seed(0)
    hybrid, _ = convert(tiny_teacher[0], plan_layers(8, "1/4", window=64), progress=False)
    return hybrid.double()


@pytest.fixture(scope="module")
def hybrid8(tiny_hybrid):
    """The tiny InfiniteVL layout (window 8) in fp64: every frame slides the window."""
    return copy.deepcopy(tiny_hybrid).double()


def assert_same_states(cache, reference, exact: bool = False) -> None:
    ours, theirs = held_states(cache), held_states(reference)
    assert [key for key, _ in ours] == [key for key, _ in theirs]
    assert any(key == "recurrent" for key, _ in ours) and any(key == "keys" for key, _ in ours)
    for (key, mine), (_, expected) in zip(ours, theirs, strict=True):
        if exact:
            assert torch.equal(mine, expected), key
        else:
            torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    ("model_name", "count", "size"),
    [("hybrid64", 14, (56, 56)), ("hybrid8", 5, (56, 84)), ("hybrid64", 3, (112, 56))],
)
def test_frame_by_frame_equals_one_shot_prefill(request, tiny_teacher, model_name, count, size):
    model, processor = request.getfixturevalue(model_name), tiny_teacher[1]
    stream = frames(count, size)
    session = stream_of(model, processor, stream, frame_size=size)
    inputs = one_shot_inputs(processor, stream)
    assert session.state.cache.get_seq_length() == inputs["input_ids"].shape[1]  # the same tokens
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    if model_name == "hybrid64" and count == 14:
        assert 64 < output_cache(out).get_seq_length()  # the window filled and slid
    assert_same_states(session.state.cache, output_cache(out))
    torch.testing.assert_close(session.next_token_logits(), out.logits[:, -1].float())


def test_positions_are_get_rope_index_of_the_whole_sequence(hybrid8, tiny_teacher):
    processor = tiny_teacher[1]
    stream = frames(4, (84, 56))
    seen = []
    hook = hybrid8.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"][:, 0]), with_kwargs=True
    )
    try:
        session = stream_of(hybrid8, processor, stream, frame_size=(84, 56))
        session.ask_ids(QUESTION, max_new_tokens=1)
    finally:
        hook.remove()
    inputs = one_shot_inputs(processor, stream, QUESTION)
    expected, _ = hybrid8.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    positions = torch.cat(seen, dim=1)  # prefix, frames, question (the first answer token needs no forward)
    assert torch.equal(positions, expected[:, 0])
    assert session.position == int(positions[:, : -len(seen[-1][0])].max()) + 1


def test_pixels_match_the_image_processor(hybrid8, tiny_teacher):
    processor = tiny_teacher[1]
    frame = frames(1, (84, 112))[0]
    session = StreamingSession(hybrid8, processor, frame_size=(84, 112))
    rows = session.encoder.patches(session.encoder.prepare(frame))
    assert torch.equal(
        rows, processor.image_processor(images=[Image.fromarray(frame)], return_tensors="pt")["pixel_values"]
    )
    as_tensor = session.encoder(torch.from_numpy(frame))
    assert torch.equal(session.encoder(Image.fromarray(frame)), as_tensor)
    assert torch.equal(session.encoder(frame), as_tensor)
    assert session.encoder(frames(1, (90, 70))[0]).shape == as_tensor.shape  # resized to the frame size
    with pytest.raises(ValueError, match=r"\(height, width, 3\) uint8"):
        session.add_frame(np.zeros((84, 112), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiples of 28"):
        StreamingSession(hybrid8, processor, frame_size=100)


def frame_encoders(model, processor, size: tuple[int, int]) -> tuple[FrameEncoder, FrameEncoder]:
    """(packed, split) encoders of one model and frame size, without CUDA graphs."""
    grid_thw = torch.tensor([[1, size[0] // 14, size[1] // 14]])
    prompt = build_frame_prompt(model, processor, grid_thw, None)
    return tuple(
        FrameEncoder(model, processor, prompt, size, use_graph=False, packed_attention=packed)
        for packed in (True, False)
    )


@pytest.mark.parametrize("model_name", ["tiny_hybrid", "hybrid8"])  # fp32, fp64
def test_packed_vision_attention_equals_the_split_per_window(request, tiny_teacher, model_name):
    model, processor = request.getfixturevalue(model_name), tiny_teacher[1]
    size = (84, 112)  # windows of 16, 16, 8 and 8 patches, then one full-attention layer
    packed, split = frame_encoders(model, processor, size)
    assert packed.packed_attention and not split.packed_attention
    visual = model.model.visual
    seen = []
    hook = visual.blocks[0].attn.register_forward_pre_hook(
        lambda module, args: seen.append(configured_attention(module.config))
    )
    frame = frames(1, size)[0]
    try:
        with torch.no_grad():
            embeds, reference = packed(frame), split(frame)
            rows = packed.patches(packed.prepare(frame)).to(visual.dtype)
            stock = visual(rows, grid_thw=packed.grid_thw).pooler_output  # split per window by transformers
    finally:
        hook.remove()
    assert seen == [PACKED_ATTENTION, "sdpa", "sdpa"] and configured_attention(visual.config) == "sdpa"
    masks = packed.vision_kwargs["block_diagonal_masks"].entries
    assert len(masks) == 1  # the windowed layers' mask, built once; the full-attention layer needs none
    torch.testing.assert_close(embeds, reference)
    vision = embeds[0, len(packed.before) : len(packed.before) + len(stock)]
    torch.testing.assert_close(vision, stock.to(embeds.dtype))


def test_packed_vision_attention_is_undone_when_encoding_fails(tiny_hybrid, tiny_teacher):
    visual = tiny_hybrid.model.visual
    packed, _ = frame_encoders(tiny_hybrid, tiny_teacher[1], (56, 56))

    def fail(module, args):
        assert configured_attention(module.attn.config) == PACKED_ATTENTION
        raise RuntimeError("vision block failed")

    hook = visual.blocks[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="vision block failed"), torch.no_grad():
            packed(frames(1)[0])
    finally:
        hook.remove()
    assert configured_attention(visual.config) == "sdpa"
    assert configured_attention(tiny_hybrid.config.get_text_config(decoder=True)) == "sdpa"


def test_flash_vision_attention_is_left_alone(tiny_hybrid, tiny_teacher):
    config = tiny_hybrid.model.visual.config
    set_attention_implementation(config, "flash_attention_2")
    try:
        encoder, _ = frame_encoders(tiny_hybrid, tiny_teacher[1], (56, 56))
    finally:
        set_attention_implementation(config, "sdpa")
    assert not encoder.packed_attention and "block_diagonal_masks" not in encoder.vision_kwargs
    assert encoder.vision_kwargs["max_window_seqlen"] == 16


def test_ask_leaves_the_stream_untouched_and_answers_like_generate(hybrid64, tiny_teacher):
    processor = tiny_teacher[1]
    stream = frames(12)
    session = stream_of(hybrid64, processor, stream[:6], frame_size=56)
    before = [tensor.clone() for tensor in session.state.tensors()]
    position = session.position
    answer = session.ask_ids(QUESTION, max_new_tokens=8)
    after = session.state.tensors()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and len(before) == len(after)
    assert session.position == position and session.frames == 6

    inputs = one_shot_inputs(processor, stream[:6], QUESTION)
    with torch.no_grad():
        expected = hybrid64.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert answer == expected[0, inputs["input_ids"].shape[1] :].tolist()
    assert session.ask(QUESTION, max_new_tokens=8) == processor.decode(answer, skip_special_tokens=True)

    for frame in stream[6:]:  # the stream goes on from where it was, as if nothing had been asked
        session.add_frame(frame)
    unasked = stream_of(hybrid64, processor, stream, frame_size=56)
    assert_same_states(session.state.cache, unasked.state.cache, exact=True)


def test_static_decode_answers_like_the_dynamic_branch(hybrid64, tiny_teacher):
    processor = tiny_teacher[1]
    stream = frames(16)
    static = stream_of(hybrid64, processor, stream[:3], frame_size=56, static_decode=True)
    dynamic = stream_of(hybrid64, processor, stream[:3], frame_size=56, static_decode=False)
    assert static.static_decode and not dynamic.static_decode
    for frame in [None, *stream[3:]]:  # the window (64) fills and the ring wraps around
        if frame is not None:
            static.add_frame(frame)
            dynamic.add_frame(frame)
        if frame is None or static.frames in (9, 16):
            assert static.ask_ids(QUESTION, max_new_tokens=6) == dynamic.ask_ids(QUESTION, max_new_tokens=6)
    assert static.static_answers is not None and dynamic.static_answers is None
    assert_same_states(static.state.cache, dynamic.state.cache, exact=True)
    with pytest.raises(ValueError, match="static_decode"):
        StreamingSession(tiny_teacher[0], processor, static_decode=True, allow_growing_cache=True)
    with pytest.raises(ValueError, match="needs cuda_graphs=True"):
        StreamingSession(hybrid64, processor, cuda_graphs=False, compile=True)
    with pytest.raises(ValueError, match="overlap_encoder=True encodes frames on a second CUDA stream"):
        StreamingSession(hybrid64, processor, cuda_graphs=False, overlap_encoder=True)
    # overlap_encoder's default: with the graphs
    assert StreamingSession(hybrid64, processor, cuda_graphs=False).overlap is None
    with pytest.raises(
        ValueError, match="compile='reduce-overhead': give True, False or a torch.compile mode"
    ):
        StreamingSession(hybrid64, processor, cuda_graphs=False, compile="reduce-overhead")


def test_answers_choose_tokens_as_generate_does(hybrid8, tiny_teacher, monkeypatch):
    """generate()'s logits processors and warpers (a repetition penalty over the whole prompt, temperature,
    top-k, top-p): with the same seed a sampled answer draws generate()'s tokens, a greedy one is generate()'s."""
    processor, stream = tiny_teacher[1], frames(3)
    config = copy.deepcopy(hybrid8.generation_config)
    config.update(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.5)
    monkeypatch.setattr(hybrid8, "generation_config", config)
    session = stream_of(hybrid8, processor, stream, frame_size=56)
    inputs = one_shot_inputs(processor, stream, QUESTION)
    prompt = inputs["input_ids"][0]
    question_ids = processor.tokenizer(QUESTION + session.prompt.suffix, add_special_tokens=False)[
        "input_ids"
    ]
    assert torch.equal(session.prompt_ids(question_ids), prompt)  # what the processors see as the history

    def generated(seed: int, **options) -> list[int]:
        torch.manual_seed(seed)
        with torch.no_grad():
            return hybrid8.generate(**inputs, max_new_tokens=6, **options)[0, len(prompt) :].tolist()

    sampled = []
    for seed in range(2):
        torch.manual_seed(seed)
        sampled.append(session.ask_ids(QUESTION, max_new_tokens=6, do_sample=True))
        assert sampled[-1] == generated(seed, do_sample=True)
    assert sampled[0] != sampled[1]  # the seed changes the draws: the answers were sampled
    assert session.ask_ids(QUESTION, max_new_tokens=6) == generated(0, do_sample=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.ask(QUESTION, max_new_tokens=0)


def test_memory_is_constant_as_frames_stream(tiny_hybrid, tiny_teacher):
    session = StreamingSession(tiny_hybrid, tiny_teacher[1], frame_size=56)
    sizes = {}
    for index, frame in enumerate(frames(50), start=1):
        session.add_frame(frame)
        sizes[index] = session.cache_bytes()
    assert sizes[5] == sizes[50] and sizes[50] > 0
    assert session.state.cache.get_seq_length() > 50 * session.tokens_per_frame


def test_full_attention_models_are_refused_unless_growth_is_allowed(tiny_teacher):
    teacher, processor = tiny_teacher
    with pytest.raises(ValueError, match="allow_growing_cache=True"):
        StreamingSession(teacher, processor, frame_size=56)
    session = StreamingSession(teacher, processor, frame_size=56, allow_growing_cache=True)
    session.add_frame(frames(1)[0])
    first = session.cache_bytes()
    session.add_frame(frames(1)[0])
    assert session.cache_bytes() > first
    inputs = one_shot_inputs(processor, frames(1) * 2)
    with torch.no_grad():
        expected = teacher(**{**inputs, "pixel_values": inputs["pixel_values"].float()}).logits[:, -1]
    torch.testing.assert_close(session.next_token_logits(), expected, rtol=1e-4, atol=1e-5)


class ReplayedStep:
    """A CPU stand-in for a CUDA graph over a `CapturedPrefill` step: capture runs the warm-ups, then the step once
    with what it did to the cache undone (a capture runs the Python but executes no kernel); replay runs the step
    again with the host's counts put back afterwards (a replay runs no Python) and writes into the captured
    output."""

    def __init__(self, step, output, cache):
        self.step, self.output, self.cache = step, output, cache
        self.replays = 0

    @classmethod
    def capturing(cls, cache, captured: list):
        def capture(step, warmup=None, pool=None):
            assert pool == (
                captured[0].pool() if captured else None
            )  # later graphs share the first one's pool
            for _ in range(2):
                warmup()
            saved = cache.clone()
            output = step()
            cache.copy_from(saved)
            captured.append(cls(step, output, cache))
            return captured[-1], output

        return capture

    def pool(self):
        return ("pool", id(self))

    def replay(self):
        host = self.cache.seen_tokens, list(self.cache.row_tokens)
        result = self.step()
        self.cache.seen_tokens, self.cache.row_tokens = host
        self.cache.advance_host(0)
        self.output.copy_(result)
        self.replays += 1


def captured_and_eager(model, processor, monkeypatch, compile: bool = False):
    """Two sessions on the CPU: one whose prefill is captured (in `ReplayedStep`s, listed in the third value) from
    the second frame on, one eager."""
    captured = StreamingSession(model, processor, frame_size=56, cuda_graphs=False)
    eager = StreamingSession(model, processor, frame_size=56, cuda_graphs=False)
    graphs = []
    monkeypatch.setattr(
        stream_state, "capture_cuda_graph", ReplayedStep.capturing(captured.state.cache, graphs)
    )
    captured.capture_prefill, captured.compile = True, compile
    return captured, eager, graphs


def test_captured_prefill_bookkeeping_equals_eager(hybrid64, tiny_teacher, monkeypatch):
    """What the prefill graphs rely on, short of CUDA: a step that writes only into the cache's buffers and its
    device-side counts, host counts advanced by hand, the graph of a filling window and of a full one captured at
    the second frame and each replayed in its phase, a question answered on the stream in between."""
    processor, stream = tiny_teacher[1], frames(16)
    captured, eager, graphs = captured_and_eager(hybrid64, processor, monkeypatch)
    buffers = [tensor.data_ptr() for tensor in captured.state.tensors()[:-1]]
    sizes, full_from = {}, None
    for frame in stream:
        full = captured.state.window_full()
        full_from = captured.frames if full and full_from is None else full_from
        captured.add_frame(frame)
        eager.add_frame(frame)
        sizes[captured.frames] = captured.cache_bytes()
        assert (captured.prefill_graph is not None) == (captured.frames >= 2)
        if captured.frames == 7:
            assert captured.ask_ids(QUESTION, 4) == eager.ask_ids(QUESTION, 4)
    assert sizes[2] == sizes[16]
    assert [tensor.data_ptr() for tensor in captured.state.tensors()[: len(buffers)]] == buffers
    assert len(graphs) == 2 and 2 < full_from < 14  # captured at frame 2: the window filled later
    assert graphs[0].replays == full_from - 1 and graphs[1].replays == 16 - full_from
    assert_same_states(captured.state.cache, eager.state.cache, exact=True)
    assert captured.state.cache.get_seq_length() == eager.state.cache.get_seq_length()
    assert torch.equal(captured.next_token_logits(), eager.next_token_logits())
    assert captured.ask_ids(QUESTION, 4) == eager.ask_ids(QUESTION, 4)
    captured.add_frame(stream[0])
    eager.add_frame(stream[0])
    assert_same_states(captured.state.cache, eager.state.cache, exact=True)


def test_streams_leave_no_cycles_holding_their_buffers(hybrid64, tiny_teacher, monkeypatch):
    """The captured prefill's put-back copy of the stream, the answers' saved slots and the sessions themselves
    go when let go, not whenever Python's cycle collector next runs: on a GPU each is the whole state."""
    gc.collect()
    gc.disable()
    try:
        captured, eager, _ = captured_and_eager(hybrid64, tiny_teacher[1], monkeypatch)
        for frame in frames(4):
            captured.add_frame(frame)
            eager.add_frame(frame)
        assert captured.ask_ids(QUESTION, 3) == eager.ask_ids(QUESTION, 3)
        caches = [thing for thing in gc.get_objects() if isinstance(thing, StaticHybridCache)]
        assert sorted(map(id, caches)) == sorted([id(captured.state.cache), id(eager.state.cache)])
        # (the captured one's stand-in for a CUDA graph holds its step, and so the session: a graph does not)
        alive = [weakref.ref(thing) for thing in (eager, eager.state, eager.state.cache)]
        del eager, caches
        assert [ref() for ref in alive] == [None] * len(alive)
    finally:
        gc.enable()


def test_overlapped_encoding_starts_once_both_steps_are_captured(hybrid64, tiny_teacher, monkeypatch):
    """overlap_encoder's ordering, short of CUDA (a stand-in for the side stream that logs): frames go to the side
    stream only once the encoder and the prefill are captured, and each frame's embeddings are marked read after
    they are copied into the prefill's inputs and before its graph replays (CUDA: tests below)."""
    processor, stream = tiny_teacher[1], frames(5)
    captured, eager, _ = captured_and_eager(hybrid64, processor, monkeypatch)
    log = []

    class SideStream:
        read = type("Event", (), {"record": lambda self: log.append("read")})()

        def encode(self, encoder, frame):
            log.append("side")
            return encoder(frame)

    captured.overlap, captured.encoder.graph = SideStream(), "captured"  # as on CUDA after the first frame
    for name in ("load", "replay"):
        real = getattr(stream_state.CapturedPrefill, name)
        monkeypatch.setattr(
            stream_state.CapturedPrefill,
            name,
            lambda self, *a, real=real, name=name: log.append(name) or real(self, *a),
        )
    for index, frame in enumerate(stream):
        log.append(f"frame {index}")
        captured.add_frame(frame)
        eager.add_frame(frame)
    # frame 0 prefills eagerly, frame 1 is encoded before the prefill is captured (then replayed), then each
    # frame: side stream, load, read, replay
    assert log[: log.index("frame 2")] == ["frame 0", "read", "frame 1", "load", "read", "replay"]
    assert log[log.index("frame 2") :] == [
        item for i in (2, 3, 4) for item in (f"frame {i}", "side", "load", "read", "replay")
    ]
    assert_same_states(captured.state.cache, eager.state.cache, exact=True)


@pytest.mark.slow
def test_compiled_captured_prefill_equals_eager(hybrid64, tiny_teacher, monkeypatch):
    """The captured prefill with its forward through torch.compile (traced on the warm-ups over the stream's own
    state, which is put back after each): the same states, logits and answers as eager (CPU stand-in for the graph;
    about 30 s of compilation on 2 cores)."""
    processor, stream = tiny_teacher[1], frames(6)
    captured, eager, graphs = captured_and_eager(hybrid64, processor, monkeypatch, compile=True)
    for frame in stream:
        captured.add_frame(frame)
        eager.add_frame(frame)
    assert len(graphs) == 2 and captured.captured.run is not stream_state.StreamState.run
    assert_close_states(captured, eager)
    torch.testing.assert_close(captured.next_token_logits(), eager.next_token_logits())
    assert captured.ask_ids(QUESTION, 4) == eager.ask_ids(QUESTION, 4)


@needs_cuda("CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager(tiny_hybrid, tiny_teacher):
    model = copy.deepcopy(tiny_hybrid).cuda()
    stream = frames(40)
    graphed = StreamingSession(model, tiny_teacher[1], frame_size=56, cuda_graphs=True)
    eager = StreamingSession(model, tiny_teacher[1], frame_size=56, cuda_graphs=False, static_decode=False)
    memory = {}
    for index, frame in enumerate(stream, start=1):
        graphed.add_frame(frame)
        eager.add_frame(frame)
        gc.collect()  # live tensors only: garbage waiting for the cycle collector is not stream state
        memory[index] = torch.cuda.memory_allocated()
        if index in (3, 20, 40):
            torch.testing.assert_close(
                graphed.next_token_logits(), eager.next_token_logits(), rtol=1e-4, atol=1e-4
            )
            assert_close_states(graphed, eager)
    assert graphed.encoder.graph is not None and graphed.prefill_graph is not None
    # by default, the ViT's own stream with the graphs
    assert graphed.overlap is not None and eager.overlap is None
    assert graphed.ask_ids(QUESTION, 6) == eager.ask_ids(QUESTION, 6)
    assert memory[20] == memory[40]


@needs_cuda("CUDA streams need a GPU")
def test_overlapped_encoder_streams_like_one_stream(tiny_hybrid, tiny_teacher):
    """overlap_encoder: each frame encoded on a second stream beside the previous frame's prefill, host frames
    and frames already on the GPU (the second written by the current stream just before), no synchronisation
    between frames: the same states, logits and answer as one stream, frame for frame."""
    model = copy.deepcopy(tiny_hybrid).cuda()
    processor, stream = tiny_teacher[1], frames(24)
    overlapped = StreamingSession(model, processor, frame_size=56, overlap_encoder=True)
    single = StreamingSession(model, processor, frame_size=56, overlap_encoder=False)
    buffer = torch.empty((56, 56, 3), dtype=torch.uint8, device="cuda")
    for index, frame in enumerate(stream, start=1):
        if index % 2:
            buffer.copy_(torch.from_numpy(frame).pin_memory(), non_blocking=True)  # queued, not waited for
            overlapped.add_frame(buffer)
            single.add_frame(buffer)
        else:
            overlapped.add_frame(frame)
            single.add_frame(frame)
        if index in (4, 24):
            torch.testing.assert_close(
                overlapped.next_token_logits(), single.next_token_logits(), rtol=1e-4, atol=1e-4
            )
            assert_close_states(overlapped, single)
    assert overlapped.overlap.ready.query() and overlapped.prefill_graph is not None
    assert overlapped.ask_ids(QUESTION, 6) == single.ask_ids(QUESTION, 6)


def assert_close_states(first: StreamingSession, second: StreamingSession) -> None:
    for (key, a), (_, b) in zip(held_states(first.state.cache), held_states(second.state.cache), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=key)
    assert first.state.cache.get_seq_length() == second.state.cache.get_seq_length()


# ----------------------------------------------------------------------------------------------- CLI


def write_video(path, seconds: float = 3.0, rate: int = 10, size: tuple[int, int] = (64, 48)) -> None:
    """A video whose frames are flat colours that change every frame (PyAV, the `video` extra; skips without)."""
    av = pytest.importorskip("av")

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for index in range(round(seconds * rate)):
            pixels = np.full((size[1], size[0], 3), (index * 37 % 256, index * 11 % 256, 90), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def saved_hybrid(tmp_path_factory, tiny_teacher, tiny_hybrid):
    out = tmp_path_factory.mktemp("stream") / "tiny-ivl"
    save_hybrid(tiny_hybrid, out, tiny_teacher[1])
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    write_video(path)
    return path


def test_sample_video_takes_the_first_frame_at_each_step(video):
    assert video_duration(video) == pytest.approx(3.0)
    times = [time for time, _ in sample_video(video, 2.0)]
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert len(list(sample_video(video, 50.0))) == 30  # faster than the video: every frame once
    assert next(sample_video(video, 1.0))[1].shape == (48, 64, 3)


def test_stream_cli_answers_at_the_given_times(saved_hybrid, video, capsys):
    base = [
        "stream",
        str(video),
        str(saved_hybrid),
        "--fps",
        "2",
        "--frame-size",
        "56",
        "--max-new-tokens",
        "3",
    ]
    assert main([*base, "--ask", "What colour?", "--at", "1s,2.5"]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("[")]
    assert lines == [
        "[1.0s, 3 frames] What colour?",
        "[2.5s, 6 frames] What colour?",
    ]  # frames at 0, 0.5, ...
    assert "streamed 6 frames (6 tokens each)" in out.err
    assert main([*base, "--ask", "What colour?", "--at", "0:01", "--ask", "Anything else?", "--at", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines == ["[1.0s, 3 frames] What colour?", "[3.0s, 6 frames] Anything else?"]
    assert main([*base, "--ask", "Anything else?", "--no-overlap-encoder"]) == 0  # no --at: asked at the end
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")] == [
        "[3.0s, 6 frames] Anything else?"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"video": "missing.mp4"}, "does not exist"),
        ({"--fps": "0"}, "--fps must be positive"),
        ({"--at": "9s"}, "past the end of the video"),
        ({"--at": "soon"}, "is not seconds"),
        ({"--frame-size": "50"}, "multiple of 28"),
        ({"--max-new-tokens": "0"}, "at least 1"),
        ({"extra": ["--ask", "Q2?", "--at", "1", "--at", "2"]}, "one --at per --ask"),
        ({"extra": ["--compile"], "--device": "cpu"}, "--compile compiles the CUDA-graph"),
        (
            {"extra": ["--compile-mode", "max-autotune-no-cudagraphs"], "--device": "cpu"},
            "--compile compiles",
        ),
        ({"extra": ["--compile-mode", "reduce-overhead"]}, "invalid choice: 'reduce-overhead'"),
        ({"extra": ["--overlap-encoder"], "--device": "cpu"}, "--overlap-encoder overlaps"),
    ],
)
def test_stream_cli_rejects_bad_input_before_loading(
    saved_hybrid, video, capsys, monkeypatch, change, message
):
    monkeypatch.setattr("hybridize.cli.stream_video", lambda *args: pytest.fail("loaded the model"))
    options = {"--fps": "2", "--at": "1s", "--frame-size": "56", "--max-new-tokens": "2", **change}
    args = [
        "stream",
        options.pop("video", str(video)),
        str(saved_hybrid),
        "--ask",
        "Q?",
        *options.pop("extra", []),
    ]
    args += [item for key, value in options.items() for item in (key, value)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
