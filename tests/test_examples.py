"""The runnable examples run, in a fresh interpreter as a user would start them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_mixer_example_converts_generates_and_reloads():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_mixer.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cached generation == uncached loop, save/load round trip exact" in result.stdout
    assert "retention" in result.stdout  # the conversion table lists the custom mixer's layers


def test_tiny_pipeline_runs_the_four_stages_with_the_real_configs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "tiny_pipeline.py"), "--out", str(tmp_path / "run"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "stages recorded in the final hybrid: layerwise_distillation -> end_to_end_distillation -> "
        "supervised_fine_tuning -> long_sequence_sft" in result.stdout
    )
    assert "reply of the final hybrid:" in result.stdout


def test_streaming_video_example_streams_in_constant_memory():
    pytest.importorskip("av")  # the example writes and decodes a video (the `video` extra)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "streaming_video.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2.0s, 9 frames] answer:" in result.stdout and "[5.0s, 21 frames] answer:" in result.stdout
    assert "streamed 24 frames" in result.stdout and "(constant)" in result.stdout
