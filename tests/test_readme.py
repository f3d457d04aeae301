"""The README's Python tour runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_tour_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "runs" / "api-ivl" / "config.json").is_file()


def test_readme_data_records_are_read_as_documented(tmp_path):
    """Each record of the README's data section becomes a chat with its media resolved next to the data file."""
    from hybridize.lightning_modules.data import normalize_record

    (block,) = re.findall(r"```jsonl\n(.*?)```", README.read_text(), flags=re.S)
    records = [json.loads(line) for line in block.splitlines() if line.strip()]
    for folder, name in (("images", "cat.jpg"), ("clips", "cook.mp4")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    kinds = []
    for record in records:
        messages, media = normalize_record(record, tmp_path)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        kinds += [(kind, path.relative_to(tmp_path).as_posix()) for kind, path in media]
    assert kinds == [("image", "images/cat.jpg"), ("image", "images/cat.jpg"), ("video", "clips/cook.mp4")]
