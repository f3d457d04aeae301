"""Streaming video into a hybrid, frame by frame, in constant memory, with questions along the way.

Writes a short synthetic video (a white square moving over a background whose colour changes every second)
with PyAV, converts the embedded tiny Qwen2.5-VL to the InfiniteVL layout (window 64, so the window fills and
slides), and streams the video at 4 frames per second through a `StreamingSession`: each frame is resized to
56x56 (4 vision tokens + <|vision_start|>/<|vision_end|>) and prefilled into the hybrid cache; questions are
answered on a branch of the state, which the stream never sees. The weights are random: the answers are noise,
the mechanics are real. On CPU in a few seconds; the same code runs Qwen2.5-VL-3B hybrids on a GPU at
448x448 (256 vision tokens per frame) with the ViT and the per-frame prefill replayed from CUDA graphs.

Run: python examples/streaming_video.py  (needs PyAV: pip install 'hybridize[video]')
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hybridize
from hybridize.inference.streaming import StreamingSession
from hybridize.media import sample_video


def write_video(path: Path, seconds: int = 6, rate: int = 12, size: int = 96) -> None:
    """A white square crossing the frame over a background that changes colour every second."""
    import av

    colours = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 190, 40), (150, 60, 170), (30, 30, 30)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(seconds * rate):
            frame = np.empty((size, size, 3), dtype=np.uint8)
            frame[:] = colours[index // rate % len(colours)]
            x = index * (size - 16) // (seconds * rate)
            frame[40:56, x : x + 16] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    torch.manual_seed(0)
    teacher, processor = hybridize.load_base_model("tiny-qwen2.5-vl")
    plan = hybridize.plan_layers(num_layers=8, ratio="1/4", window=64)
    hybrid, _ = hybridize.convert(teacher, plan, progress=False)
    session = StreamingSession(hybrid, processor, frame_size=56)
    print(f"{session.tokens_per_frame} tokens per frame, SWA window 64, layers {plan.layers}")

    questions = {2.0: "What colour is the background?", 5.0: "Where is the square now?"}
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "square.mp4"
        write_video(video)
        start, memory = time.perf_counter(), {}
        for seconds, frame in sample_video(video, fps=4):
            for at in [at for at in questions if at < seconds]:
                answer = session.ask(questions.pop(at), max_new_tokens=8)
                print(f"[{at:.1f}s, {session.frames} frames] answer: {answer!r}")
            session.add_frame(frame)
            memory[session.frames] = session.cache_bytes()
        elapsed = time.perf_counter() - start
    print(f"streamed {session.frames} frames in {elapsed:.2f} s ({session.frames / elapsed:.1f} frames/s)")
    print(
        f"state after frame 5: {memory[5]} bytes, after frame {session.frames}: {memory[session.frames]} bytes "
        f"({'constant' if memory[5] == memory[session.frames] else 'GROWING'}); "
        f"{session.state.cache.get_seq_length()} tokens seen, next M-RoPE position {session.position}"
    )


if __name__ == "__main__":
    main()
