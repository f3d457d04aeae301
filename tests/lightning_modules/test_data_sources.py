"""Hugging Face data sets as training data: parquet with embedded PNGs in the LLaVA, FineVision and messages
layouts, weighted mixtures, streams shared out between ranks and workers (every row once per epoch), resumed
mid-epoch exactly, bad rows named by source, file and row, packing, `hybridize data check`."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hybridize import cli
from hybridize.converters import convert, plan_layers, save_hybrid
from hybridize.lightning_modules.data import (
    STREAM_KEY,
    ChatDataModule,
    ChatStream,
    StreamLoader,
    StreamProgress,
    check,
)
from hybridize.presets import tiny_qwen2_5_vl, tiny_qwen2_5_vl_processor

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.transformers_surface

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 180, 30)]
SAMPLE = re.compile(r"Sample (\d+):")


def png(index: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), COLOURS[index % 3]).save(buffer, format="PNG")
    return buffer.getvalue()


def question(i: int) -> str:
    return f"Sample {i}: what colour?"


def rows(layout: str, ids) -> list[dict]:
    """Conversations about image i % 3 in `layout`, the image embedded as PNG bytes."""
    out = []
    for i in ids:
        image, answer = {"bytes": png(i), "path": None}, f"Colour {i % 3}."
        if layout == "llava":
            turns = [{"from": "human", "value": f"<image>\n{question(i)}"}, {"from": "gpt", "value": answer}]
            out.append({"id": i, "image": image, "conversations": turns})
        elif layout == "finevision":
            out.append({"images": [image], "texts": [{"user": question(i), "assistant": answer}]})
        else:
            content = [{"type": "image", "text": None}, {"type": "text", "text": question(i)}]
            reply = [{"type": "text", "text": answer}]
            out.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": reply}],
                        "images": [image]})  # fmt: skip
    return out


def write_parquet(folder, layout: str, ids, files: int = 4):
    """`ids` as `files` parquet shards of `layout` rows, images as the `datasets` Image feature."""
    data = datasets.Dataset.from_list(rows(layout, ids))
    column = "image" if layout == "llava" else "images"
    feature = datasets.Image() if layout == "llava" else datasets.List(datasets.Image())
    data = data.cast_column(column, feature)
    folder.mkdir(parents=True)
    for index in range(files):
        data.shard(files, index, contiguous=True).to_parquet(str(folder / f"part-{index:02d}.parquet"))
    return folder


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen2_5_vl_processor()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Parquet folders: llava (ids 0-23, 4 files), finevision (ids 100-111, 4 files), messages (ids 0-23, 3 files)."""
    root = tmp_path_factory.mktemp("parquet")
    return {
        "llava": write_parquet(root / "llava", "llava", range(24)),
        "finevision": write_parquet(root / "finevision", "finevision", range(100, 112)),
        "messages": write_parquet(root / "messages", "messages", range(24), files=3),
    }


def module(sources, processor, **options) -> ChatDataModule:
    options = {"streaming": True, "max_length": 256, "batch_size": 2, **options}
    data_module = ChatDataModule(sources=sources, processor=processor, **options)
    data_module.setup("fit")
    return data_module


def sample_ids(batch, tokenizer) -> list[int]:
    return [int(i) for i in SAMPLE.findall(tokenizer.decode(batch["input_ids"].flatten()))]


def rank_batches(data_module, rank, world_size, workers, epoch=0, progress=None, processes=None):
    """The batches one rank's DataLoader gives (`workers` partitions, in `processes` worker processes: by default
    one per partition, none for one partition), as its own pipeline."""
    stream = ChatStream(
        data_module.train_sources, [s.weight for s in data_module.sources], data_module.encoder,
        data_module.stream_options, rank=rank, world_size=world_size, workers=workers,
    )  # fmt: skip
    progress = progress or StreamProgress()
    batches = []
    processes = processes if processes is not None else workers if workers > 1 else 0
    for batch in StreamLoader(stream, progress, lambda: epoch, num_workers=processes):
        progress.update(batch.pop(STREAM_KEY))
        batches.append(batch)
    return batches


def test_the_three_layouts_give_identical_batches(data, processor):
    batches = []
    for layout in ("llava", "finevision", "messages"):
        folder = write_parquet(data["llava"].parent / f"same-{layout}", layout, range(6), files=1)
        data_module = module([str(folder)], processor, shuffle=False, batch_size=3)
        assert data_module.train_sources[0].layout == layout  # detected from the columns
        batches.append(rank_batches(data_module, 0, 1, 1))
    for other in batches[1:]:
        for mine, theirs in zip(batches[0], other, strict=True):
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert torch.equal(mine[key], theirs[key]), key
    assert batches[0][0]["image_grid_thw"].tolist() == [[1, 4, 4]] * 3


def test_parquet_samples_equal_json_samples_with_image_files(tmp_path, data, processor):
    (tmp_path / "images").mkdir()
    with (tmp_path / "d.jsonl").open("w") as file:
        for i, record in enumerate(rows("llava", range(4))):
            (tmp_path / "images" / f"{i}.png").write_bytes(record["image"]["bytes"])
            file.write(json.dumps({**record, "image": f"images/{i}.png"}) + "\n")
    files = ChatDataModule(str(tmp_path / "d.jsonl"), processor=processor, shuffle=False,
                           max_length=256, batch_size=2)  # fmt: skip
    files.setup("fit")
    expected = list(files.train_dataloader())
    streamed = rank_batches(
        module([str(data["llava"])], processor, shuffle=False), 0, 4, 1
    )  # file 0: ids 0-5
    for mine, theirs in zip(streamed, expected, strict=False):
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize(
    "layout", ["llava", "messages"]
)  # 4 files: whole files per partition; 3 files: by row
def test_two_ranks_of_two_workers_see_every_row_once_per_epoch(data, processor, layout):
    data_module = module([str(data[layout])], processor)
    seen = {}
    for epoch in (0, 1):
        ids = [
            i for rank in (0, 1) for batch in rank_batches(data_module, rank, 2, 2, epoch)
            for i in sample_ids(batch, processor.tokenizer)
        ]  # fmt: skip
        assert sorted(ids) == list(range(24))
        seen[epoch] = ids
    assert seen[0] != seen[1]  # a new shuffle each epoch


def test_a_weighted_mixture_is_deterministic_and_ends_with_its_first_exhausted_source(data, processor):
    sources = [{"path": str(data["llava"]), "weight": 0.8}, {"path": str(data["finevision"]), "weight": 0.2}]
    runs = [
        [i for batch in rank_batches(module(sources, processor, seed=seed), 0, 1, 1) for i in sample_ids(batch, processor.tokenizer)]
        for seed in (0, 0, 1)
    ]  # fmt: skip
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for ids in runs:
        assert len(set(ids)) == len(ids)
        assert sorted(i for i in ids if i < 100) == list(range(24)) or set(range(100, 112)) <= set(ids)
        assert Counter(i >= 100 for i in ids)[False] > Counter(i >= 100 for i in ids)[True]


def test_packed_streams_fill_rows_to_max_length(data, processor):
    data_module = module([str(data["llava"])], processor, pack=True, max_length=200, batch_size=2)
    batches = rank_batches(data_module, 0, 1, 1)  # samples of 96-97 tokens: two per row, two rows per batch
    ids = [i for batch in batches for i in sample_ids(batch, processor.tokenizer)]
    assert sorted(ids) == list(range(24)) and len(batches) == 6
    for batch in batches:
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 200
        assert len(sample_ids(batch, processor.tokenizer)) == 4


class Recorder(L.LightningModule):
    """Records the sample ids of every batch it trains on."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.tokenizer, self.seen = tokenizer, []

    def training_step(self, batch, batch_idx):
        assert STREAM_KEY not in batch
        self.seen.append(sample_ids(batch, self.tokenizer))
        return self.weight**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, sources, processor, steps, ckpt_path=None):
    data_module = ChatDataModule(sources=sources, processor=processor, streaming=True, max_length=256, batch_size=2,
                                 num_workers=2, on_bad_sample="skip", shuffle_buffer=4)  # fmt: skip
    recorder = Recorder(processor.tokenizer)
    checkpoints = ModelCheckpoint(tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[checkpoints],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(recorder, datamodule=data_module, ckpt_path=ckpt_path)
    return recorder.seen, data_module


def test_a_run_killed_mid_epoch_and_resumed_sees_what_the_uninterrupted_run_sees(tmp_path, data, processor):
    broken = rows("llava", range(200, 204))
    broken[1]["image"] = {"bytes": b"not a png", "path": None}
    folder = tmp_path / "broken"
    datasets.Dataset.from_list(broken).cast_column("image", datasets.Image()).to_parquet(
        str(folder / "a.parquet")
    )
    sources = [{"path": str(data["llava"]), "weight": 3}, {"path": str(folder), "weight": 1}]
    full, full_data = fit(tmp_path / "full", sources, processor, steps=14)
    killed, _ = fit(tmp_path / "killed", sources, processor, steps=5)
    (checkpoint,) = (tmp_path / "killed" / "checkpoints").glob("*step=5.ckpt")
    resumed, resumed_data = fit(tmp_path / "resumed", sources, processor, steps=14, ckpt_path=checkpoint)
    assert killed == full[:5] and resumed == full[5:]
    # The broken source runs out first, ending each epoch after a few steps: 14 steps cross several epochs.
    assert full_data.progress.epoch == resumed_data.progress.epoch > 0
    assert full_data.skipped == resumed_data.skipped and full_data.skipped["unreadable_media"] > 0
    assert full_data.progress.samples == resumed_data.progress.samples


def test_bad_rows_are_named_by_source_file_and_row_or_skipped(tmp_path, data, processor):
    bad = rows("llava", range(4))
    bad[1]["image"] = {"bytes": b"\x89PNG broken", "path": None}
    bad[2]["conversations"] = []
    folder = tmp_path / "bad"
    datasets.Dataset.from_list(bad).cast_column("image", datasets.Image()).to_parquet(
        str(folder / "a.parquet")
    )
    strict = module([{"path": str(folder)}], processor, shuffle=False)
    with pytest.raises(
        ValueError,
        match=rf"^data.sources\[0\]: {folder}/a.parquet row 1: unreadable_media: cannot read image <11 embedded bytes>: .*\. Fix the record, or set data.on_bad_sample: skip",
    ):
        rank_batches(strict, 0, 1, 1, processes=1)  # the error comes from a worker process as one line
    lenient = module([{"path": str(folder)}], processor, on_bad_sample="skip", shuffle=False)
    progress = StreamProgress()
    ids = [
        i
        for batch in rank_batches(lenient, 0, 1, 1, progress=progress)
        for i in sample_ids(batch, processor.tokenizer)
    ]
    assert ids == [0, 3] and dict(progress.skipped) == {"unreadable_media": 1, "empty_conversation": 1}

    fake = tmp_path / "fake"
    datasets.Dataset.from_list(rows("llava", range(2))).to_parquet(str(fake / "a.parquet"))
    (fake / "b.parquet").write_text("this is not parquet")
    with pytest.raises(
        ValueError,
        match=rf"^data.sources\[0\]: {fake}/b.parquet row 0: unreadable data .*replace or remove the file",
    ):
        rank_batches(module([str(fake)], processor, shuffle=False), 0, 1, 1)  # fmt: skip
    with pytest.raises(
        ValueError, match=rf"^data.sources\[0\]: cannot read {fake}/b.parquet with `datasets`: Parquet magic"
    ):
        module([str(fake / "b.parquet")], processor)  # fmt: skip


def test_unknown_columns_and_a_missing_named_column_are_one_line_errors(tmp_path, data, processor):
    folder = tmp_path / "other"
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(folder / "a.parquet"))
    with pytest.raises(
        ValueError, match=r"has columns \['question', 'answer'\], which fit no known record layout"
    ):
        module([str(folder)], processor)
    with pytest.raises(
        ValueError, match=r"has no 'texts' column, which format='finevision' reads; its columns are"
    ):
        module([{"path": str(data["llava"]), "format": "finevision"}], processor)
    with pytest.raises(
        ValueError, match=r"data.sources\[0\] = \{'path': 'x', 'wieght': 2\}; expected a path or"
    ):
        ChatDataModule(sources=[{"path": "x", "wieght": 2}])
    with pytest.raises(ValueError, match="one of the two"):
        ChatDataModule()


def test_saved_and_prepared_data_sets_stream_the_same_rows(tmp_path, data, processor):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows("llava", range(8))).cast_column("image", datasets.Image()).save_to_disk(
        str(saved)
    )
    data_module = module([str(saved)], processor, streaming=False)
    ids = [
        i
        for rank in (0, 1)
        for batch in rank_batches(data_module, rank, 2, 1)
        for i in sample_ids(batch, processor.tokenizer)
    ]
    assert sorted(ids) == list(range(8))


def test_data_check_reports_reasons_lengths_and_images(tmp_path, data, processor, monkeypatch):
    bad = rows("llava", range(5))
    bad[0]["image"] = {"bytes": b"junk", "path": None}
    bad[3]["conversations"] = []
    folder = tmp_path / "bad"
    datasets.Dataset.from_list(bad).cast_column("image", datasets.Image()).to_parquet(
        str(folder / "a.parquet")
    )
    monkeypatch.setattr(check, "load_chat_processor", lambda name: processor)
    out = str(tmp_path / "report")
    assert cli.main(["data", "check", str(folder), "--processor", "tiny-qwen2.5-vl", "--out", out]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["rows"] == 5 and report["usable"] == 3
    assert report["problems"] == {"unreadable_media": 1, "empty_conversation": 1}
    assert report["examples"]["empty_conversation"] == [
        f'data.sources[0]: {folder}/a.parquet row 3: "conversations" is empty'
    ]
    assert report["images_per_sample"] == {"1": 3} and len(report["token_lengths"]) == 3
    assert (tmp_path / "report" / "token_lengths.png").stat().st_size > 0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    teacher, tiny_processor = tiny_qwen2_5_vl()
    teacher.name_or_path = "tiny-qwen2.5-vl"
    hybrid, _ = convert(teacher, plan_layers(8, "1/4", window=8192), progress=False)
    return save_hybrid(hybrid, root / "converted", tiny_processor)


def test_hybridize_train_streams_a_weighted_mixture_and_saves_its_position(
    tmp_path, data, converted, monkeypatch
):
    monkeypatch.setattr("sys.argv", ["hybridize"])
    sources = json.dumps(
        [{"path": str(data["llava"]), "weight": 0.8}, {"path": str(data["finevision"]), "weight": 0.2}]
    )
    config = Path(__file__).resolve().parents[2] / "configs" / "infinitevl" / "stage1_layerwise.yaml"
    assert cli.main(
        ["train", "--config", str(config),
         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
         "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), "--model.init_args.checkpoint", str(converted),
         "--model.init_args.dtype", "null", "--model.init_args.export_dir", "null",
         "--data.init_args.train_files", "null", "--data.init_args.sources", sources,
         "--data.init_args.streaming", "true", "--data.init_args.num_workers", "0",
         "--data.init_args.max_length", "256"]
    ) == 0  # fmt: skip
    (last,) = tmp_path.rglob("last.ckpt")
    (rank,) = torch.load(last, weights_only=False)["ChatDataModule"]["stream_ranks"]
    assert rank["samples"] == 2 and rank["epoch"] == 0
