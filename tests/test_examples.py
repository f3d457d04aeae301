"""The runnable examples run, in a fresh interpreter as a user would start them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_mixer_example_converts_generates_and_reloads():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_mixer.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cached generation == uncached loop, save/load round trip exact" in result.stdout
    assert "retention" in result.stdout  # the conversion table lists the custom mixer's layers
