"""Stage 1a/1b distillation: the teacher inside the hybrid, what trains, losses going down, padding ignored."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from hybridize.converters import convert, plan_layers
from hybridize.lightning_modules import (
    EndToEndDistillation,
    LayerwiseDistillation,
    attach_teacher,
    detach_teacher,
    distillation_kl,
    distillation_mode,
)
from hybridize.mixers import TokenMixer
from hybridize.presets import tiny_model

LAYERS = 4


def hybrid_and_teacher(model_type="llama", seed=0):
    teacher = tiny_model(model_type, seed=seed, num_hidden_layers=LAYERS)
    torch.manual_seed(seed)
    hybrid, _ = convert(teacher, plan_layers(LAYERS, "1/4", window=4096), progress=False)
    return hybrid.train(), teacher


def batches(count, seed=0, batch=4, length=24):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 256, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -5:] = 0  # one right-padded row, as training batches are collated
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone()})
    return out


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit(module, steps, data):
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return recorder.losses


@pytest.mark.parametrize("model_type", ["llama", "qwen2_5_vl"])
def test_teacher_mode_is_the_teacher_and_student_mode_the_hybrid(model_type):
    hybrid, teacher = hybrid_and_teacher(model_type)
    hybrid.eval()
    inputs = {key: value for key, value in batches(1)[0].items() if key != "labels"}
    with torch.no_grad():
        student_before = hybrid(**inputs).logits
        attach_teacher(hybrid, teacher)
        with distillation_mode(hybrid, "teacher"):
            assert torch.equal(hybrid(**inputs).logits, teacher(**inputs).logits)
        with distillation_mode(hybrid, "student"):
            assert torch.equal(hybrid(**inputs).logits, student_before)
    detach_teacher(hybrid)
    assert not any(type(m).__name__ == "DistilledLayer" for m in hybrid.modules())


def test_layerwise_stage_trains_only_the_mixers_and_its_loss_goes_down():
    hybrid, teacher = hybrid_and_teacher()
    before = {name: tensor.clone() for name, tensor in hybrid.state_dict().items()}
    module = LayerwiseDistillation(hybrid, teacher, learning_rate=3e-3)
    losses = fit(module, 40, batches(40))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    detach_teacher(hybrid)
    mixer_prefixes = tuple(  # the linear mixers; the sliding-window layer is the teacher's own attention
        f"{n}." for n, m in hybrid.named_modules() if isinstance(m, TokenMixer) and not m.wraps_attention
    )
    changed = {name for name, tensor in hybrid.state_dict().items() if not torch.equal(before[name], tensor)}
    assert changed and all(name.startswith(mixer_prefixes) for name in changed), sorted(changed)[:5]
    assert module.parameter_counts["trainable"] == sum(
        p.numel() for n, p in hybrid.named_parameters() if n.startswith(mixer_prefixes)
    )


def test_end_to_end_stage_kl_goes_down():
    hybrid, teacher = hybrid_and_teacher(seed=1)
    module = EndToEndDistillation(hybrid, teacher, learning_rate=1e-2, temperature=2.0)
    losses = fit(module, 40, batches(40, seed=1))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def test_kl_ignores_padding():
    hybrid, teacher = hybrid_and_teacher(seed=2)
    module = EndToEndDistillation(hybrid.double(), teacher.double())
    hybrid.eval()
    batch = batches(1, seed=2)[0]
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((4, 6), 256)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(4, 6, dtype=torch.long)], dim=1),
    }
    with torch.no_grad():
        plain = module.losses({k: v for k, v in batch.items() if k != "labels"})["loss"]
        extra = module.losses(padded)["loss"]
    torch.testing.assert_close(plain, extra, rtol=1e-9, atol=1e-12)


def test_kl_is_zero_for_identical_logits_and_masks_tokens():
    logits = torch.randn(2, 5, 11)
    assert distillation_kl(logits, logits, None).abs() < 1e-6
    other = torch.randn(2, 5, 11)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, :2] = False
    masked = distillation_kl(other, logits, valid)
    assert torch.allclose(masked, distillation_kl(other[:, 2:], logits[:, 2:], None))


def test_checkpoints_hold_only_the_trainable_parameters():
    hybrid, teacher = hybrid_and_teacher()
    module = LayerwiseDistillation(hybrid, teacher)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(".self_attn.student." in key for key in checkpoint["state_dict"])


def test_a_teacher_with_another_layout_is_refused():
    hybrid, _ = hybrid_and_teacher()
    with pytest.raises(ValueError, match="not this hybrid's teacher"):
        attach_teacher(hybrid, tiny_model("llama", num_hidden_layers=LAYERS + 1))
