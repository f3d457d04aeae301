"""Hugging Face data sets as training sources: local parquet / arrow / JSON(L) files or folders, `save_to_disk`
folders and hub ids, read through the `datasets` library as shards of rows.

A source is opened without reading its rows: `datasets` lists its shards (one per data file, or contiguous row
ranges of a prepared / saved data set), the record layout is detected from its columns, and media columns are left
encoded (`decode(False)`: images stay bytes until a sample is built).
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridize.lightning_modules.data.formats import LAYOUTS, detect_layout

# Data file suffix -> the `datasets` builder that reads it.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
# Shards a prepared or saved (map-style) data set is cut into: divisible by every count of ranks x workers up to
# 10, and by 12, 14, 16, ..., so that each partition reads only its own shards (see `stream.SourceReader`).
MAP_SHARDS = 5040
ROWS_PER_READ = 16  # rows `datasets` hands over at a time


@dataclass(frozen=True)
class DataSource:
    """One entry of `data.sources`: where the data is and how much of the mixture it makes.

    path: a local data file, folder or glob of parquet / arrow / JSON(L) files, a `save_to_disk` folder, or a hub
        id. weight: its share of the mixture (normalised over the sources). split / subset: the split and config of
        a hub data set. format: the record layout (auto, or one of formats.LAYOUTS). media_root: what relative
        media paths are resolved against (default: the data file's folder).
    """

    path: str
    weight: float = 1.0
    split: str = "train"
    subset: str | None = None
    format: str = "auto"
    media_root: str | None = None

    @classmethod
    def parse(cls, entry: Any, index: int) -> DataSource:
        """A YAML entry (a path, or a mapping of the fields above) checked, naming the bad key or value."""
        entry = {"path": entry} if isinstance(entry, (str, Path)) else entry
        fields = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - fields:
            raise ValueError(
                f"data.sources[{index}] = {entry!r}; expected a path or a mapping with `path` and optionally "
                f"{', '.join(sorted(fields - {'path'}))}."
            )
        source = cls(**{**entry, "path": str(entry["path"])})
        if not source.weight > 0:
            raise ValueError(f"data.sources[{index}].weight = {source.weight!r}; expected a positive number.")
        if source.format != "auto" and source.format not in LAYOUTS:
            raise ValueError(
                f"data.sources[{index}].format = {source.format!r}; expected auto or one of {', '.join(LAYOUTS)}."
            )
        return source


@dataclass
class OpenSource:
    """A source opened through `datasets`: its rows by shard, and how to name a row in messages."""

    name: str
    dataset: Any  # datasets.IterableDataset, media left encoded
    layout: str
    files: list[Path] | None  # the local data file of each shard, when the shards are files
    rows_per_shard: (
        tuple[int, int] | None
    )  # (rows, shards) of a map-style data set cut into contiguous shards
    media_root: Path | None  # None: the folder of each shard's data file

    @property
    def num_shards(self) -> int:
        return self.dataset.n_shards

    def shard(self, index: int, start: int = 0) -> Iterator[dict]:
        """Rows of shard `index` from row `start` on; a file `datasets` cannot read is an error naming it."""
        rows = self.dataset.shard(num_shards=self.num_shards, index=index)
        rows = rows.skip(start) if start else rows
        row = start
        try:
            # `iter`, not `__iter__`: in a DataLoader worker `__iter__` keeps only the worker's share of the shards,
            # and the stream has already given each worker its own.
            for batch in rows.iter(batch_size=ROWS_PER_READ):
                for values in zip(*batch.values(), strict=True):
                    yield dict(zip(batch, values, strict=True))
                    row += 1
        except Exception as error:  # pyarrow / datasets raise many kinds for a file that is not what it says
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{self.locate(index, row)}: unreadable data ({reason}); replace or remove the file."
            ) from None

    def locate(self, shard: int, row: int) -> str:
        """Where row `row` of shard `shard` is, for messages: the file and row, or the data set's row."""
        if self.files is not None:
            return f"{self.name}: {self.files[shard]} row {row}"
        if self.rows_per_shard is not None:  # contiguous shards, the first `extra` one row longer
            rows, shards = self.rows_per_shard
            base, extra = divmod(rows, shards)
            return f"{self.name}: row {base * shard + min(shard, extra) + row}"
        return f"{self.name}: shard {shard} of {self.num_shards}, row {row}"

    def media_root_of(self, shard: int) -> Path:
        return self.media_root or self.files[shard].parent


def data_files(path: str) -> list[Path]:
    """The local data files `path` names (a file, a folder searched recursively, or a glob), sorted."""
    expanded = Path(path).expanduser()
    if expanded.is_dir():
        return sorted(p for p in expanded.rglob("*") if p.suffix in BUILDERS and p.is_file())
    if glob.has_magic(path):
        return sorted(Path(p) for p in glob.glob(str(expanded), recursive=True) if Path(p).suffix in BUILDERS)
    return [expanded] if expanded.is_file() else []


def open_source(source: DataSource, streaming: bool, name: str) -> OpenSource:
    """Open `source` through `datasets` (no row is read except, for JSON, the first one to learn its columns).

    `streaming`: read data files as they are (`load_dataset(..., streaming=True)`); otherwise `load_dataset`
    prepares its memory-mapped Arrow cache first (once per data set). `save_to_disk` folders are read in place.
    """
    import datasets

    expanded = Path(source.path).expanduser()
    media_root = Path(source.media_root).expanduser() if source.media_root else None
    files, rows_per_shard = None, None
    if (expanded / "state.json").is_file() or (expanded / "dataset_dict.json").is_file():  # save_to_disk
        dataset = datasets.load_from_disk(str(expanded))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = _split(dataset, source, name)
        rows_per_shard = (len(dataset), min(len(dataset), MAP_SHARDS))
        dataset = dataset.to_iterable_dataset(num_shards=rows_per_shard[1])
        media_root = media_root or expanded
    elif files := data_files(source.path):
        builders = {BUILDERS[file.suffix] for file in files}
        if len(builders) > 1:
            raise ValueError(
                f"{name} ({source.path}) mixes data file kinds {sorted(builders)}; give each kind its own source."
            )
        try:
            dataset = datasets.load_dataset(
                builders.pop(), data_files=[str(f) for f in files], split="train", streaming=streaming
            )
        except Exception as error:  # datasets / pyarrow raise many kinds for an unreadable file
            raise ValueError(f"{name}: cannot read {source.path} with `datasets`: {error}") from None
        if expanded.is_dir() or len({file.parent for file in files}) == 1:
            media_root = media_root or (expanded if expanded.is_dir() else files[0].parent)
        if not streaming:
            rows_per_shard = (len(dataset), min(len(dataset), MAP_SHARDS))
            dataset, files = dataset.to_iterable_dataset(num_shards=rows_per_shard[1]), None
        elif dataset.n_shards != len(files):
            files = None  # the builder cut the files otherwise: shards are named by index
    elif expanded.exists() or glob.has_magic(source.path):
        raise FileNotFoundError(
            f"{name}: {source.path} holds no data files ({', '.join(BUILDERS)}) and is not a save_to_disk folder."
        )
    else:  # a hub id
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split, streaming=streaming)
        if not streaming:
            rows_per_shard = (len(dataset), min(len(dataset), MAP_SHARDS))
            dataset = dataset.to_iterable_dataset(num_shards=rows_per_shard[1])
    dataset = dataset.decode(False)
    columns = dataset.column_names or list(
        next(iter(dataset.shard(num_shards=dataset.n_shards, index=0)), {})
    )
    layout = detect_layout(columns, source.format, where=f"{name} ({source.path})")
    if files is None:
        media_root = media_root or Path.cwd()
    return OpenSource(name, dataset, layout, files, rows_per_shard, media_root)


def _split(dataset_dict, source: DataSource, name: str):
    if source.split not in dataset_dict:
        raise ValueError(
            f"{name} ({source.path}) has splits {list(dataset_dict)}, not split={source.split!r}; set its split."
        )
    return dataset_dict[source.split]
