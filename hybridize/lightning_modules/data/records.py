"""JSON / JSONL files of chat records, held as raw bytes in one buffer and parsed when a record is used."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np


def expand_data_files(files: list[str] | str) -> list[Path]:
    """Paths and glob patterns -> existing files, in the given order (each pattern's matches sorted)."""
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    paths = []
    for pattern in map(os.path.expanduser, map(str, patterns)):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(
                f"No data file matches {pattern!r}; check data.train_files / data.val_files."
            )
        for match in matches:
            if not os.path.isfile(match):
                raise FileNotFoundError(
                    f"Data file {match} does not exist; check data.train_files / data.val_files."
                )
            paths.append(Path(match))
    if not paths:
        raise ValueError("No data files given: set data.train_files to JSON / JSONL files of chat records.")
    return paths


class RecordStore:
    """The raw JSON text of every record of some files, in one byte buffer with offsets.

    DataLoader workers share one buffer without the copy-on-write growth that millions of small Python
    objects cause; a record is parsed when it is used.
    """

    def __init__(self, paths: list[Path]):
        self.files = list(paths)
        blobs, file_index, positions, self.is_lines = [], [], [], []
        for index, path in enumerate(self.files):
            records, is_lines = _read_records(path)
            self.is_lines.append(is_lines)
            for position, blob in records:
                blobs.append(blob)
                file_index.append(index)
                positions.append(position)
        self.offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.file_index = np.asarray(file_index, dtype=np.int32)
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.file_index)

    def raw(self, index: int) -> bytes:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes()

    def path(self, index: int) -> Path:
        return self.files[self.file_index[index]]

    def source(self, index: int) -> str:
        """Where record `index` is: `file:line` for JSONL, `file[record i]` for a JSON list."""
        file = self.file_index[index]
        position = int(self.positions[index])
        return (
            f"{self.files[file]}:{position}"
            if self.is_lines[file]
            else f"{self.files[file]}[record {position}]"
        )


def _read_records(path: Path) -> tuple[list[tuple[int, bytes]], bool]:
    """(position, raw JSON) of each record, and whether the file is JSON lines (position = line number)."""
    data = path.read_bytes()
    if path.suffix != ".jsonl":
        try:
            records = json.loads(data)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": a .json file that holds JSON lines
                raise ValueError(
                    f"{path} is not valid JSON ({error}); give a list of records or JSON lines."
                ) from None
        else:
            if not isinstance(records, list):
                raise ValueError(
                    f"{path} holds a JSON {type(records).__name__}; expected a list of chat records."
                )
            return [(i, json.dumps(r, ensure_ascii=False).encode()) for i, r in enumerate(records)], False
    lines = data.split(b"\n")
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()], True
