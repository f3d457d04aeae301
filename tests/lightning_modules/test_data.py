"""Chat data: both record formats, labels on assistant replies only, vision tensors as Qwen2.5-VL takes them,
truncation that never splits an image, bad records caught at setup, packing, videos."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler

from hybridize.lightning_modules.data import (
    IGNORE_INDEX,
    ChatDataModule,
    ChatDataset,
    EpochSampler,
    PackedBatchSampler,
    collate,
    normalize_record,
)
from hybridize.presets import tiny_model, tiny_model_with_tokenizer, tiny_qwen2_5_vl_processor
from hybridize.testing.synthetic import write_synthetic_chat_data

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

MERGE = 4  # spatial_merge_size ** 2 of the tiny Qwen2.5-VL


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen2_5_vl_processor()


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_5_vl", num_hidden_layers=2)


@pytest.fixture(scope="module")
def llama():
    """(tiny Llama with sdpa attention, byte-level tokenizer with the ChatML template)."""
    return tiny_model_with_tokenizer("llama")(num_hidden_layers=2)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Directory with red.png / blue.png (56x56: 4 tokens) and wide.png (112x56: 8 tokens)."""
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (56, 56), (220, 30, 30)).save(root / "red.png")
    Image.new("RGB", (56, 56), (30, 30, 220)).save(root / "blue.png")
    pixels = np.random.default_rng(0).integers(0, 256, (56, 112, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "wide.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat(*turns, **media):
    """A LLaVA-style record from alternating human / gpt texts."""
    speakers = ["human", "gpt"] * len(turns)
    return {
        **media,
        "conversations": [{"from": s, "value": v} for s, v in zip(speakers, turns, strict=False)],
    }


def dataset(path, processor, **options):
    return ChatDataset(path, processor, progress=False, **options)


def label_runs(tokenizer, sample):
    """The decoded runs of consecutive trained tokens."""
    labels = sample["labels"].tolist()
    runs, run = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def model_inputs(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def test_labels_cover_assistant_replies_and_their_end_token(tmp_path, processor):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("What is 2 + 2?", "4", "Repeat: abc", "abc")])
    sample = dataset(path, processor)[0]
    assert label_runs(processor.tokenizer, sample) == ["4<|im_end|>", "abc<|im_end|>"]
    text = processor.tokenizer.decode(sample["input_ids"])  # the newline after <|im_end|> is not trained
    assert text.endswith("<|im_start|>assistant\nabc<|im_end|>\n")
    assert sample["mm_token_type_ids"].eq(0).all()


def test_llava_and_messages_records_give_identical_batches(tmp_path, processor, media):
    llava = [
        {"image": ["red.png", "wide.png"], "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "<image>\nLeft one.\n<image>\nRight one. Colours?"},
            {"from": "gpt", "value": "Red and noise."},
        ]},
        chat("What colour?", "Blue.", image="blue.png"),  # no placeholder: the image opens the first user turn
    ]  # fmt: skip
    messages = [
        {"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [
                {"type": "image", "image": "red.png"}, {"type": "text", "text": "Left one."},
                {"type": "image", "path": "wide.png"}, {"type": "text", "text": "Right one. Colours?"},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red and noise."}]},
        ]},
        {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "blue.png"}}, "What colour?"]},
            {"role": "assistant", "content": "Blue."},
        ]},
    ]  # fmt: skip
    batches = []
    for name, records in (("llava.json", llava), ("messages.jsonl", messages)):
        path = tmp_path / name
        if name.endswith(".json"):
            path.write_text(json.dumps(records))
        else:
            write_jsonl(path, records)
        data = dataset(path, processor, media_root=str(media))
        batches.append(collate([data[0], data[1]], processor.tokenizer.pad_token_id))
    assert batches[0].keys() == batches[1].keys()
    for key in batches[0]:
        assert torch.equal(batches[0][key], batches[1][key]), key


def test_encoding_matches_the_processor(tmp_path, processor, media):
    record = chat("<image>\nWhat is in the picture?", "Noise.", image="wide.png")
    sample = dataset(write_jsonl(tmp_path / "d.jsonl", [record]), processor, media_root=str(media))[0]
    messages, _ = normalize_record(record, media)
    text = processor.apply_chat_template(messages, tokenize=False)
    reference = processor(
        text=[text], images=[Image.open(media / "wide.png").convert("RGB")], return_tensors="pt"
    )
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(sample[key], reference[key][0]), key
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(sample[key], reference[key]), key


def test_vision_tensors_line_up_and_run_through_qwen2_5_vl(tmp_path, processor, media, qwen):
    records = [
        chat("<image>\nColour?", "Red.", image="red.png"),
        chat("<image><image>\nBoth?", "Noise, blue.", image=["wide.png", "blue.png"]),
        chat("What is 1 + 1?", "2"),
    ]
    data = dataset(write_jsonl(tmp_path / "d.jsonl", records), processor, media_root=str(media))
    batch = collate([data[i] for i in range(3)], processor.tokenizer.pad_token_id)
    grids = batch["image_grid_thw"]
    assert grids.tolist() == [[1, 4, 4], [1, 4, 8], [1, 4, 4]]
    assert batch["pixel_values"].shape[0] == grids.prod(-1).sum()
    image_tokens = batch["input_ids"] == processor.image_token_id
    assert image_tokens.sum() == grids.prod(-1).sum() // MERGE
    assert torch.equal(batch["mm_token_type_ids"], image_tokens.long())
    assert torch.equal(batch["attention_mask"].sum(-1), torch.as_tensor(data.lengths))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss = qwen(**batch, use_cache=False).loss
    assert torch.isfinite(loss)


def test_pixel_budget(tmp_path, processor, media):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("<image>\nWhat?", "Noise.", image="wide.png")])
    small = dataset(path, processor, media_root=str(media), max_pixels=56 * 56)[0]
    large = dataset(path, processor, media_root=str(media), min_pixels=112 * 224)[0]
    assert small["image_grid_thw"].prod() == 8 and large["image_grid_thw"].prod() == 128


def test_truncation_never_splits_an_image(tmp_path, processor, media, qwen):
    record = chat(
        "<image>\nColour?", "Red.", "<image>\nAnd this one?", "Blue.", image=["red.png", "wide.png"]
    )
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    full = dataset(path, processor, media_root=str(media))[0]
    ids = full["input_ids"].tolist()
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    second_image_start = [i for i, token in enumerate(ids) if token == vision_start][1]
    max_length = second_image_start + 4  # a naive cut would keep the start of the second image
    assert full["input_ids"][max_length - 1] == processor.image_token_id
    data = dataset(path, processor, media_root=str(media), max_length=max_length)
    sample = data[0]
    assert torch.equal(sample["input_ids"], full["input_ids"][:second_image_start])
    assert sample["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert torch.equal(sample["pixel_values"], full["pixel_values"][:16])  # the first image's rows
    assert label_runs(processor.tokenizer, sample) == ["Red.<|im_end|>"]
    assert data.truncated == 1
    with torch.no_grad():
        assert torch.isfinite(
            qwen(**collate([sample], processor.tokenizer.pad_token_id), use_cache=False).loss
        )


def test_truncation_that_leaves_no_reply_skips_the_sample(tmp_path, processor, media):
    records = [chat("<image>\n" + "long question " * 10, "Red.", image="red.png"), chat("Hi", "Hello")]
    data = dataset(
        write_jsonl(tmp_path / "d.jsonl", records), processor, media_root=str(media), max_length=60
    )
    assert len(data) == 1 and data.skipped == {"no_labels_after_truncation": 1}


BAD_RECORDS = {
    "missing_media": chat("<image>\nWhat?", "A cat.", image="nowhere/cat.jpg"),
    "empty_conversation": {"conversations": []},
    "unknown_role": {"conversations": [{"from": "narrator", "value": "Hi"}, {"from": "gpt", "value": "Hi"}]},
    "placeholder_mismatch": chat("<image>\n<image>\nCompare.", "Same.", image="red.png"),
    "no_assistant_turn": {"messages": [{"role": "user", "content": "Hello?"}]},
    "unreadable_media": chat("What?", "Nothing.", image="broken.png"),
}


def test_bad_records_fail_setup_with_file_line_and_fix(tmp_path, processor, media):
    lines = [json.dumps(record) for record in [chat("Hi", "Hello"), *BAD_RECORDS.values()]] + ["{not json"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as error:
        dataset(path, processor, media_root=str(media))
    message = str(error.value)
    assert "7 of 8 records" in message and "data.on_bad_sample: skip" in message
    assert f"{path}:2: missing_media: image file not found: {media / 'nowhere/cat.jpg'}" in message
    for line, reason in enumerate([*BAD_RECORDS][1:5], 3):
        assert f"{path}:{line}: {reason}" in message
    assert "and 2 more" in message  # past the first five shown

    data = dataset(path, processor, media_root=str(media), on_bad_sample="skip")
    assert len(data) == 1
    assert data.skipped == {reason: 1 for reason in [*BAD_RECORDS, "invalid_json"]}


def test_media_that_breaks_after_setup(tmp_path, processor):
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [chat("What?", "Black.", image="a.png"), chat("Hi", "Hello")])
    strict, lenient = dataset(path, processor), dataset(path, processor, on_bad_sample="skip")
    (tmp_path / "a.png").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=rf"{path}:1: unreadable_media: cannot decode image .*a.png"):
        strict[0]
    assert torch.equal(lenient[0]["input_ids"], lenient[1]["input_ids"])  # the next sample instead


def test_too_long_samples_error_or_skip(tmp_path, processor):
    records = [chat("Hi", "Hello"), chat("Tell me a story", "Once upon a time " * 20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(ValueError, match=rf"{path}:2: too_long: \d+ tokens(.|\n)*Raise data.max_length"):
        dataset(path, processor, max_length=100, on_too_long="error")
    data = dataset(path, processor, max_length=100, on_too_long="skip")
    assert len(data) == 1 and data.skipped == {"too_long": 1}


def test_settings_are_checked_early(tmp_path):
    with pytest.raises(ValueError, match="data.on_too_long='cut'.*truncate, skip, error"):
        ChatDataModule("x.jsonl", on_too_long="cut")
    with pytest.raises(ValueError, match="data.on_bad_sample"):
        ChatDataModule("x.jsonl", on_bad_sample="ignore")
    with pytest.raises(ValueError, match="data.max_length=0"):
        ChatDataModule("x.jsonl", max_length=0)
    with pytest.raises(ValueError, match="set data.processor"):
        ChatDataModule(str(write_jsonl(tmp_path / "d.jsonl", [chat("Hi", "Hello")]))).setup("fit")
    with pytest.raises(FileNotFoundError, match="data.train_files"):
        ChatDataModule(str(tmp_path / "missing.jsonl"), processor="tiny-llama").setup("fit")


def test_text_only_model(tmp_path, llama, media):
    _, tokenizer = llama
    records = [chat("What is 2 + 2?", "4"), chat("<image>\nWhat?", "Red.", image="red.png")]
    data = dataset(
        write_jsonl(tmp_path / "d.jsonl", records), tokenizer, media_root=str(media), on_bad_sample="skip"
    )
    assert data.skipped == {"media_unsupported": 1}
    assert set(data[0]) == {"input_ids", "labels"} and label_runs(tokenizer, data[0]) == ["4<|im_end|>"]


def test_packing_restarts_positions_and_matches_unpacked_losses(tmp_path, llama):
    model, tokenizer = llama
    records = [chat(f"What is {i} + {i}?", str(2 * i) * (i + 1)) for i in range(5)]
    data = dataset(write_jsonl(tmp_path / "d.jsonl", records), tokenizer)
    samples = [data[i] for i in range(5)]
    lengths = [len(s["input_ids"]) for s in samples]
    batch = collate(samples, tokenizer.pad_token_id, pack=True, max_length=2 * max(lengths))
    rows, width = batch["input_ids"].shape
    assert rows == 3 and width == lengths[2] + lengths[3] and "attention_mask" not in batch  # rows 01, 23, 4
    segments = [*lengths[:2], width - sum(lengths[:2]), *lengths[2:], width - lengths[4]]  # with the padding
    assert batch["cu_seq_lens_q"].tolist() == np.cumsum([0, *segments]).tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == max(segments)
    positions = torch.cat([torch.arange(n) for n in segments]).view(rows, width)
    assert torch.equal(batch["position_ids"], positions)
    starts = batch["cu_seq_lens_q"][:-1].long()
    assert (batch["labels"].flatten()[starts] == IGNORE_INDEX).all()  # never predicted across samples

    def token_losses(logits, labels):  # per-token cross-entropy, HF's shift
        return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")

    with torch.no_grad():
        packed = model(**model_inputs(batch), use_cache=False).logits.flatten(0, 1)
        sample_starts = np.cumsum([0, *segments])[[0, 1, 3, 4, 5]].tolist()  # 2 and 6 are padding
        for sample, start in zip(samples, sample_starts, strict=True):
            alone = model(input_ids=sample["input_ids"][None], use_cache=False).logits[0]
            end = start + len(sample["input_ids"])
            expected = token_losses(alone, sample["labels"])
            torch.testing.assert_close(token_losses(packed[start:end], sample["labels"]), expected)


def test_packed_batch_sampler_fills_rows_and_reshuffles_each_epoch():
    lengths = [30, 50, 20, 70, 40, 60, 10, 90]
    sampler = PackedBatchSampler(EpochSampler(lengths), 2, lengths=lengths, max_length=100, seed=1)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(8)) and len(sampler) == len(first)
    for batch in first:
        samples = [{"input_ids": torch.zeros(lengths[i]), "labels": torch.zeros(lengths[i])} for i in batch]
        rows = collate(samples, 0, pack=True, max_length=100)["input_ids"]
        assert rows.shape[0] <= 2 and rows.shape[1] <= 100
    sampler.sampler.set_epoch(1)  # as Lightning does at each epoch
    assert list(sampler) != first

    # Under DDP (Lightning hands it a DistributedSampler) the ranks share out the same batches evenly.
    single = list(PackedBatchSampler(EpochSampler(lengths), 1, lengths=lengths, max_length=100))
    shards = [
        list(PackedBatchSampler(DistributedSampler(lengths, 3, rank), 1, lengths=lengths, max_length=100))
        for rank in range(3)
    ]
    assert all(len(shard) == len(single) // 3 for shard in shards)
    assert sorted(batch for shard in shards for batch in shard) == sorted(single[: len(single) // 3 * 3])


def test_datamodule_trains_with_lightning(tmp_path, llama):
    model, _ = llama
    train = write_synthetic_chat_data(tmp_path / "train.jsonl", 12, seed=0, with_images=False)
    val = write_synthetic_chat_data(tmp_path / "val.jsonl", 4, seed=1, with_images=False)
    data = ChatDataModule(
        str(train), str(val), processor="tiny-llama", max_length=256, batch_size=2, pack=True
    )

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            assert batch["input_ids"].shape[0] <= 2 and batch["input_ids"].shape[1] <= 256
            return self.model(**batch, use_cache=False).loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(**batch, use_cache=False).loss, batch_size=1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Module(), datamodule=data)
    assert data.skipped == {} and len(data.train_dataset) == 12 and len(data.val_dataset) == 4


def test_synthetic_data_in_both_formats(tmp_path, processor):
    batches = []
    for record_format in ("llava", "messages"):
        path = write_synthetic_chat_data(
            tmp_path / f"{record_format}.jsonl", 16, seed=3, record_format=record_format
        )
        data = dataset(path, processor)
        assert len(data) == 16 and data.skipped == {}
        batches.append(collate([data[i] for i in range(16)], processor.tokenizer.pad_token_id))
    assert batches[0]["image_grid_thw"].shape[0] > 0
    for key in batches[0]:
        assert torch.equal(batches[0][key], batches[1][key]), key


def write_video(path, frames, fps):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_video_in_qwen2_vl_layout(tmp_path, processor, qwen):
    av = pytest.importorskip("av")
    frames = np.random.default_rng(0).integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    write_video(tmp_path / "clip.mp4", frames, fps=4)  # 2 s: 4 frames at video_fps=2 -> grid (2, 4, 4)
    record = {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                     {"from": "gpt", "value": "Noise."}]}  # fmt: skip
    sample = dataset(write_jsonl(tmp_path / "d.jsonl", [record]), processor, video_fps=2.0)[0]
    assert sample["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert sample["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per temporal patch, sampled at 2 fps
    assert (sample["input_ids"] == processor.video_token_id).sum() == 32 // MERGE
    assert torch.equal(
        sample["mm_token_type_ids"], (sample["input_ids"] == processor.video_token_id).long() * 2
    )

    # Reference: the decoded frames, normalised, in the layout of transformers' Qwen2VLVideoProcessor.patchify.
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    image_processor = processor.image_processor
    mean, std = (
        torch.tensor(v).view(1, 3, 1, 1) for v in (image_processor.image_mean, image_processor.image_std)
    )
    video = (
        torch.from_numpy(decoded[[0, 2, 5, 7]]).permute(0, 3, 1, 2) / 255 - mean
    ) / std  # linspace(0, 7, 4)
    patches = video.reshape(1, 2, 2, 3, 2, 2, 14, 2, 2, 14).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    torch.testing.assert_close(sample["pixel_values_videos"], patches.reshape(32, 3 * 2 * 14 * 14))

    with torch.no_grad():
        assert torch.isfinite(
            qwen(**collate([sample], processor.tokenizer.pad_token_id), use_cache=False).loss
        )
