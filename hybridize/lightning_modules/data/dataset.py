"""Chat records of JSON / JSONL files with media paths, every record checked before training starts."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hybridize.lightning_modules.data.encoding import (
    LENGTH_REASONS,
    ChatEncoder,
    Measured,
    check_options,
    encode_sample,
    load_chat_processor,
    measure,
)
from hybridize.lightning_modules.data.formats import BadSample, MediaSource, normalize_record
from hybridize.lightning_modules.data.records import RecordStore, expand_data_files

logger = logging.getLogger(__name__)

SHOWN_PROBLEMS = 5


class ChatDataset(Dataset):
    """Chat records of JSON / JSONL files as model inputs, every record checked when the dataset is built.

    Building it reads the files, normalises every record, checks its media files exist and are readable
    (headers only), renders and tokenises it and computes its length with its image / video tokens. Bad
    records (`BadSample` reasons) raise one error listing them (`on_bad_sample="error"`) or are skipped and
    counted in `skipped`; samples over `max_length` are cut (`"truncate"`: never inside an image or video,
    whose tensors are dropped with it), skipped or raise. Items are dicts of 1-D `input_ids`, `labels`
    (-100 except assistant replies), `mm_token_type_ids` (Qwen-VL) and vision tensors.

    `processor`: a processor or tokenizer object, a name or directory (`load_chat_processor`), or a
    `ChatEncoder` to share between datasets (then the pixel and video options are the encoder's). The other
    options are `ChatDataModule`'s; `num_workers` processes share the setup pass; `name` appears in messages.
    """

    def __init__(
        self,
        files: list[str] | str,
        processor,
        *,
        max_length: int = 4096,
        media_root: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        on_too_long: str = "truncate",
        on_bad_sample: str = "error",
        num_workers: int = 0,
        progress: bool = True,
        name: str | None = None,
    ):
        check_options(
            max_length=max_length,
            on_too_long=on_too_long,
            on_bad_sample=on_bad_sample,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        self.encoder = (
            processor
            if isinstance(processor, ChatEncoder)
            else ChatEncoder(
                load_chat_processor(processor),
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                video_fps=video_fps,
                video_max_frames=video_max_frames,
            )
        )
        self.max_length, self.on_too_long, self.on_bad_sample = max_length, on_too_long, on_bad_sample
        self.media_root = media_root
        paths = expand_data_files(files)
        self.name = name or (f"{paths[0]}" + (f" and {len(paths) - 1} more files" if len(paths) > 1 else ""))
        self.records = RecordStore(paths)
        self._check_records(num_workers, progress)

    # ---- setup pass

    def _check_records(self, num_workers: int, progress: bool) -> None:
        loader = DataLoader(_Measure(self), batch_size=64, num_workers=num_workers, collate_fn=list)
        measured = []
        with tqdm(
            total=len(self.records),
            desc=f"Checking {self.name}",
            unit="record",
            disable=not progress or rank_zero_only.rank != 0,
        ) as bar:
            for chunk in loader:
                measured += chunk
                bar.update(len(chunk))
        problems = [(i, m) for i, m in enumerate(measured) if m.reason is not None]
        bad = [(i, m) for i, m in problems if m.reason not in LENGTH_REASONS]
        if bad and self.on_bad_sample == "error":
            raise ValueError(
                self._report(
                    bad,
                    "unusable (on_bad_sample='error')",
                    "Fix these records, or set data.on_bad_sample: skip to drop them (they are counted in skipped).",
                )
            )
        too_long = [(i, m) for i, m in problems if m.reason == "too_long"]
        if too_long and self.on_too_long == "error":
            raise ValueError(
                self._report(
                    too_long,
                    f"longer than data.max_length={self.max_length} tokens (on_too_long='error')",
                    "Raise data.max_length, or set data.on_too_long: truncate (cuts at max_length, never inside "
                    "an image) or skip.",
                )
            )
        self.skipped = dict(Counter(m.reason for _, m in problems))
        kept = [i for i, m in enumerate(measured) if m.reason is None]
        if not kept:
            raise ValueError(
                f"No usable sample in {self.name}: {len(self.records)} records, skipped: {self.skipped}."
            )
        self.record_indices = np.asarray(kept, dtype=np.int64)
        self.lengths = np.asarray([measured[i].length for i in kept], dtype=np.int64)
        self.kept_media = np.asarray([(measured[i].images, measured[i].videos) for i in kept], dtype=np.int64)
        self.truncated = sum(measured[i].length < measured[i].full_length for i in kept)
        if problems:
            rank_zero_warn(self._report(problems, "skipped", ""))
        if self.truncated:
            rank_zero_info(
                f"{self.truncated} samples of {self.name} are cut to data.max_length={self.max_length}."
            )

    def _report(self, problems: list[tuple[int, Measured]], what: str, fix: str) -> str:
        counts = Counter(m.reason for _, m in problems)
        lines = [
            f"{len(problems)} of {len(self.records)} records of {self.name} are {what}: "
            + ", ".join(f"{reason} {count}" for reason, count in counts.most_common())
        ]
        for index, m in problems[:SHOWN_PROBLEMS]:
            lines.append(f"  {self.records.source(index)}: {m.reason}: {m.detail}")
        if len(problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
        return "\n".join(lines + ([fix] if fix else []))

    def _prepare(self, record_index: int) -> tuple[list[dict], list[tuple[str, MediaSource]]]:
        try:
            record = json.loads(self.records.raw(record_index))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadSample("invalid_json", str(error)) from None
        return normalize_record(record, self.media_root or self.records.path(record_index).parent)

    def measure(self, record_index: int) -> Measured:
        """Record `record_index` checked and measured from its text and media headers (the setup pass)."""
        try:
            messages, media = self._prepare(record_index)
        except BadSample as error:
            return Measured(reason=error.reason, detail=error.detail)
        return measure(self.encoder, messages, media, self.max_length, self.on_too_long)

    # ---- items

    def __len__(self) -> int:
        return len(self.record_indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return self.encode(position)
            except BadSample as error:  # a file that broke or changed after setup checked it
                source = self.records.source(int(self.record_indices[position]))
                if self.on_bad_sample == "error":
                    raise ValueError(
                        f"{source}: {error} (found while loading; set data.on_bad_sample: skip to replace such samples "
                        "with the next one)"
                    ) from None
                logger.warning("%s: %s; using the next sample instead", source, error)
        raise RuntimeError(f"No sample of {self.name} could be loaded.")

    def encode(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index` (of the kept samples) with decoded media, cut to its length from setup."""
        messages, media = self._prepare(int(self.record_indices[index]))
        images, videos = self.kept_media[index].tolist()
        return encode_sample(
            self.encoder, messages, media, Measured(int(self.lengths[index]), 0, images, videos)
        )


class _Measure(Dataset):
    """The setup pass as a dataset, so that DataLoader workers share it."""

    def __init__(self, dataset: ChatDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.records)

    def __getitem__(self, index: int) -> Measured:
        return self.dataset.measure(index)
