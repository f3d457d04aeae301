"""Tiny hybrids saved to disk (the stages load them the way a real run does) and synthetic batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from hybridize.converters import convert, plan_layers, save_hybrid
from hybridize.presets import tiny_model_with_tokenizer

LAYERS = 4
PLAN = {"ratio": "1/4", "window": 4096}


def converted(model_type="llama", seed=0, plan=None):
    """(hybrid, teacher, tokenizer): a tiny teacher converted with `plan` (plan_layers arguments)."""
    teacher, tokenizer = tiny_model_with_tokenizer(model_type)(seed=seed, num_hidden_layers=LAYERS)
    teacher.name_or_path = f"tiny-{model_type}"
    torch.manual_seed(seed)
    hybrid, _ = convert(teacher, plan_layers(LAYERS, **(plan or PLAN)), progress=False)
    return hybrid.train(), teacher, tokenizer


def sharpen_head(model, scale=30.0):
    """Scale the output head of a random tiny model: its logits are otherwise too flat (|logit| < 1) for a
    few dozen steps of a frozen-head stage (SFT's default, LoRA) to move the loss."""
    model.get_output_embeddings().weight.data *= scale
    return model


@pytest.fixture
def saved_hybrid(tmp_path):
    """A converted tiny Llama hybrid written as a checkpoint directory; returns (path, teacher)."""
    hybrid, teacher, tokenizer = converted()
    return save_hybrid(hybrid, tmp_path / "converted", tokenizer), teacher


def batches(count, seed=0, batch=4, length=24, labels_from=0):
    """Random byte sequences with one right-padded row; labels on the tokens from `labels_from` on."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 256, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -5:] = 0
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :labels_from] = -100
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return out


def repeat_task_batches(count, seed=0, batch=8, pairs=8):
    """Every token written twice (a a b b ...), only the second copies labelled (like assistant tokens):
    predicting them means repeating the current token, which a tiny model learns in a few dozen steps."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 256, (batch, pairs), generator=generator).repeat_interleave(2, dim=1)
        labels = input_ids.clone()
        labels[:, 0::2] = -100
        out.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return out


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def trainer(steps, **kwargs):
    defaults = dict(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def fit(module, steps, data, **kwargs):
    recorder = LossRecorder()
    kwargs["callbacks"] = [recorder, *kwargs.get("callbacks", [])]
    trainer(steps, **kwargs).fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return recorder.losses


def mean(values):
    return sum(values) / len(values)
