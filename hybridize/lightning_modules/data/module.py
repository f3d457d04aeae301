"""`ChatDataModule`: the training stages' data, from JSON / JSONL files checked up front, or from Hugging Face
data sets (parquet / arrow / JSON(L), hub ids) mixed by weight and streamed, checked lazily and resumable."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from hybridize.lightning_modules.data.collation import collate
from hybridize.lightning_modules.data.dataset import ChatDataset
from hybridize.lightning_modules.data.encoding import ChatEncoder, check_options, load_chat_processor
from hybridize.lightning_modules.data.samplers import EpochSampler, PackedBatchSampler
from hybridize.lightning_modules.data.sources import DataSource, open_source
from hybridize.lightning_modules.data.stream import (
    STREAM_KEY,
    ChatStream,
    StreamLoader,
    StreamOptions,
    StreamProgress,
)


class ChatDataModule(L.LightningDataModule):
    """Chat-format training data for the training stages, from one of two kinds of input:

    - `train_files`: LLaVA / ShareGPT or OpenAI-messages JSON / JSONL files with media paths. `setup()` checks
      every record (see `ChatDataset`): broken records raise one error listing them (`on_bad_sample: error`, the
      default) or are skipped and counted (`skip`); too-long samples are truncated (default), skipped or raise.
    - `sources`: Hugging Face data sets (see `sources.DataSource`: local parquet / arrow / JSON(L) files or folders,
      `save_to_disk` folders, hub ids) in the LLaVA, FineVision or messages layout, with embedded or referenced
      media, mixed by `weight`. They are read as a stream (see `stream.ChatStream`): nothing is scanned before
      the first step; a bad row is an error naming its source, file and row, or skipped and counted; every
      row is read once per epoch across ranks and workers; the position is saved in Lightning checkpoints, and a
      run resumed from one sees the samples the uninterrupted run would have seen. `hybridize data check` scans a
      configuration's data in full.

    `skipped` counts what was dropped, per reason. `pack: true` packs whole samples into `batch_size` rows of
    `max_length` tokens (for long-context training; see `collate`).

    Args:
        train_files / val_files: JSON (a list of records) or JSONL files, or glob patterns.
        sources: data sets, each a path / hub id or a mapping {path, weight, split, subset, format, media_root}.
        streaming: read the sources' data files as they are; otherwise `datasets` first prepares its Arrow cache.
        shuffle_buffer: rows of a source shuffled together (held in memory, media still encoded) in streams.
        processor: model directory, hub id or embedded tiny model name whose processor (or tokenizer) and chat
            template are used; normally filled from the model being trained. A built processor / tokenizer
            object also works (Python API).
        max_length: tokens per sample (per packed row with `pack`).
        media_root: directory that relative image / video paths of `train_files` are resolved against; default:
            the data file's directory.
        min_pixels / max_pixels: per-image pixel budget of Qwen2-VL-style image processors (default: the
            processor's).
        video_fps / video_max_frames: frames sampled per second of video, and at most this many.
        on_too_long: "truncate" | "skip" | "error" for samples over max_length.
        on_bad_sample: "error" | "skip" for broken records (missing media, empty conversation, unknown role...).
    """

    def __init__(
        self,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        processor: Any = None,
        max_length: int = 4096,
        batch_size: int = 1,
        num_workers: int = 0,
        media_root: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        on_too_long: str = "truncate",
        on_bad_sample: str = "error",
        pack: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        sources: list[dict[str, Any] | str] | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 256,
    ):
        super().__init__()
        check_options(
            max_length=max_length,
            on_too_long=on_too_long,
            on_bad_sample=on_bad_sample,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(
                f"data.batch_size={batch_size} and data.shuffle_buffer={shuffle_buffer} must be >= 1 and "
                f"data.num_workers={num_workers} >= 0."
            )
        if bool(train_files) == bool(sources):
            raise ValueError(
                "Give the training data as data.train_files (JSON / JSONL files of chat records) or as "
                "data.sources (Hugging Face data sets), one of the two"
                + (f"; both are set ({train_files!r} and {sources!r})." if train_files else ".")
            )
        self.save_hyperparameters(ignore=None if isinstance(processor, (str, type(None))) else ["processor"])
        self.train_files, self.val_files, self.processor = train_files, val_files, processor
        self.sources = [DataSource.parse(entry, i) for i, entry in enumerate(sources or [])]
        self.streaming = streaming
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.pack, self.shuffle, self.seed = pack, shuffle, seed
        self.stream_options = StreamOptions(
            max_length, batch_size, pack, shuffle, seed, shuffle_buffer, on_too_long, on_bad_sample
        )
        self.dataset_options = dict(
            max_length=max_length,
            media_root=media_root,
            on_too_long=on_too_long,
            on_bad_sample=on_bad_sample,
            num_workers=num_workers,
        )
        self.encoder_options = dict(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
        )
        self.encoder: ChatEncoder | None = None
        self.train_dataset: ChatDataset | None = None
        self.val_dataset: ChatDataset | None = None
        self.train_sources = None  # the opened `sources`
        self.progress = StreamProgress()

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            raise ValueError(
                "ChatDataModule has no processor: set data.processor to the model directory, hub id or embedded "
                "name whose tokenizer and chat template the data is encoded with (the trainer normally fills it "
                "from the model checkpoint)."
            )
        if self.encoder is None:
            self.encoder = ChatEncoder(load_chat_processor(self.processor), **self.encoder_options)
        options = self.dataset_options
        if stage in (None, "fit"):
            if self.sources and self.train_sources is None:
                self.train_sources = [
                    open_source(source, self.streaming, name=f"data.sources[{i}]")
                    for i, source in enumerate(self.sources)
                ]
            if self.train_files and self.train_dataset is None:
                self.train_dataset = ChatDataset(
                    self.train_files, self.encoder, name="data.train_files", **options
                )
        if self.val_dataset is None and self.val_files and stage in (None, "fit", "validate"):
            self.val_dataset = ChatDataset(self.val_files, self.encoder, name="data.val_files", **options)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped, per reason: at setup over the train and val files, and so far in the stream."""
        counts = Counter(self.progress.skipped)
        for dataset in (self.train_dataset, self.val_dataset):
            counts.update(dataset.skipped if dataset is not None else {})
        return dict(counts)

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    def _loader(self, dataset: ChatDataset, shuffle: bool) -> DataLoader:
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        collate_fn = partial(
            collate, pad_token_id=self.pad_token_id, pack=self.pack, max_length=self.max_length
        )
        if self.pack:
            batch_sampler = PackedBatchSampler(
                EpochSampler(dataset),
                self.batch_size,
                lengths=dataset.lengths,
                max_length=self.max_length,
                shuffle=shuffle,
                seed=self.seed,
            )
            return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **workers)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate_fn,
            **workers,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None and self.train_sources is None:
            self.setup("fit")
        if self.train_sources is None:
            return self._loader(self.train_dataset, self.shuffle)
        trainer = self.trainer
        stream = ChatStream(
            self.train_sources,
            [source.weight for source in self.sources],
            self.encoder,
            self.stream_options,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            workers=max(self.num_workers, 1),
        )
        epoch = lambda: self.trainer.current_epoch if self.trainer else 0  # noqa: E731
        every_rank_has = (
            trainer.strategy.reduce_boolean_decision if trainer and trainer.world_size > 1 else None
        )
        return StreamLoader(stream, self.progress, epoch, self.num_workers, every_rank_has)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and self.val_files:
            self.setup("validate")
        return self._loader(self.val_dataset, False) if self.val_dataset is not None else []

    # ---- the stream's position in checkpoints

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Take the stream's position off a batch the loop is about to train on (not one prefetched)."""
        meta = batch.pop(STREAM_KEY, None)
        if meta is not None:
            self.progress.update(meta)
        return batch

    def state_dict(self) -> dict:
        """Every rank's stream progress (Lightning calls this on all ranks and saves rank 0's copy)."""
        if not self.sources:
            return {}
        local = self.progress.state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
            return {"stream_ranks": ranks}
        return {"stream_ranks": [local]}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("stream_ranks")
        if not ranks:
            return
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        if len(ranks) != world:
            raise ValueError(
                f"The checkpoint's data position was saved by {len(ranks)} ranks and this run has {world}: "
                "resume with the same trainer.devices (and data.num_workers)."
            )
        self.progress.load_state_dict(ranks[rank])
