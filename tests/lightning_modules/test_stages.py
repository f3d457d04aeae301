"""The four training stages: what trains, losses going down, padding ignored, checks between stages, resume,
LoRA merge, export."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

import hybridize
from hybridize.converters import read_plan, save_hybrid
from hybridize.lightning_modules import (
    EndToEndDistillation,
    LayerwiseDistillation,
    LongSequenceSFT,
    SupervisedFineTuning,
    attach_teacher,
    detach_teacher,
    distillation_kl,
    distillation_mode,
    head_distillation_kl,
    token_cross_entropy,
)
from hybridize.lightning_modules.sft import adapters_follow_autocast
from hybridize.lightning_modules.stage import head_is_last
from hybridize.lightning_modules.strategies import LeaveProcessGroup
from hybridize.lightning_modules.teacher import distilled_layers
from hybridize.mixers import TokenMixer
from hybridize.presets import tiny_model
from tests.conftest import relative_rms
from tests.lightning_modules.conftest import (
    LAYERS,
    PLAN,
    batches,
    converted,
    fit,
    mean,
    repeat_task_batches,
    sharpen_head,
    trainer,
)


def mixer_prefixes(model):
    """The linear mixers' parameter prefixes (the sliding-window layer keeps the teacher's own attention)."""
    return tuple(
        f"{n}." for n, m in model.named_modules() if isinstance(m, TokenMixer) and not m.wraps_attention
    )


@pytest.mark.parametrize("model_type", ["llama", "qwen2_5_vl"])  # wrapped and native sliding windows
def test_teacher_mode_is_the_teacher_and_student_mode_the_hybrid(model_type):
    """Also beyond the window (4 of the 24 tokens): as the teacher, sliding-window layers attend to everything."""
    hybrid, teacher, _ = converted(model_type, plan={**PLAN, "window": 4})
    hybrid.eval()
    inputs = {key: value for key, value in batches(1)[0].items() if key != "labels"}
    with torch.no_grad():
        student_before = hybrid(**inputs).logits
        attach_teacher(hybrid, teacher)
        with distillation_mode(hybrid, "teacher"):
            assert torch.equal(hybrid(**inputs).logits, teacher(**inputs).logits)
        with distillation_mode(hybrid, "student"):
            assert torch.equal(hybrid(**inputs).logits, student_before)
        with distillation_mode(
            hybrid, "layerwise"
        ):  # every layer hands on the teacher's output (no cache: training)
            assert torch.equal(hybrid(**inputs, use_cache=False).logits, teacher(**inputs).logits)
    detach_teacher(hybrid)
    with torch.no_grad():
        assert torch.equal(hybrid(**inputs).logits, student_before)  # the windows are back
    assert not any(type(m).__name__ == "DistilledLayer" for m in hybrid.modules())


def test_layerwise_stage_trains_only_the_mixers_and_its_loss_goes_down(saved_hybrid):
    path, teacher = saved_hybrid
    module = LayerwiseDistillation(path, teacher=teacher, learning_rate=3e-3, schedule="constant")
    hybrid = module.hybrid
    with hybridize.lightning_modules.teacher_detached(hybrid):
        before = {name: tensor.clone() for name, tensor in hybrid.state_dict().items()}
    losses = fit(module, 40, batches(40))
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses
    detach_teacher(hybrid)
    prefixes = mixer_prefixes(hybrid)
    changed = {name for name, tensor in hybrid.state_dict().items() if not torch.equal(before[name], tensor)}
    assert changed and all(name.startswith(prefixes) for name in changed), sorted(changed)[:5]
    trainable = sum(row["trainable"] for row in module.parameter_counts.values())
    assert trainable == sum(p.numel() for n, p in hybrid.named_parameters() if n.startswith(prefixes))
    assert module.parameter_counts["teacher attention"]["trainable"] == 0


def test_layerwise_gradients_taken_per_layer_are_the_summed_losses_gradients():
    """Stage 1a takes each mixer's gradients as soon as its loss exists (freeing that graph); the gradients that
    then reach the parameters through the step's backward, scaled by what reaches the loss, are those of the
    summed loss's own graph (fp64)."""
    hybrid, teacher, _ = converted(seed=6)
    module = LayerwiseDistillation(
        hybrid.double(), teacher=teacher.double(), previous_stage=None, mse_weight=7.0
    )
    module.train()
    batch = batches(1, seed=6)[0]
    parameters = {name: p for name, p in module.hybrid.named_parameters() if p.requires_grad}
    loss = module.losses(batch)["loss"]
    layer_losses = [layer.loss for layer in distilled_layers(module.hybrid)]
    assert all(type(loss.grad_fn).__name__ == "GradientsTakenBackward" for loss in layer_losses)
    (3.0 * loss).backward()  # a factor on the way, as accumulation or a loss scale puts there
    eager = {name: p.grad.clone() for name, p in parameters.items()}
    module.zero_grad()
    with distillation_mode(module.hybrid, "layerwise") as layers, torch.no_grad():
        module.hybrid(**module.model_inputs(batch), use_cache=False)
    expected = 7.0 * torch.stack([layer.loss for layer in layers]).mean()
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert eager.keys() == {name for name, p in parameters.items() if p.grad is not None} and eager
    for name, p in parameters.items():
        torch.testing.assert_close(eager[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)


def test_end_to_end_stage_kl_goes_down():
    hybrid, teacher, _ = converted(seed=1)
    module = EndToEndDistillation(hybrid, teacher=teacher, previous_stage=None, learning_rate=1e-2)
    losses = fit(module, 40, batches(40, seed=1))
    assert mean(losses[-5:]) < 0.85 * mean(losses[:5]), losses


def test_kl_ignores_padding():
    hybrid, teacher, _ = converted(seed=2)
    module = EndToEndDistillation(hybrid.double(), teacher=teacher.double(), previous_stage=None)
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


def test_end_to_end_heads_project_only_real_tokens_with_the_loss_unchanged():
    """Positions that are padding (or an ignored id) in every row never reach either model's head, which runs
    inside the loss on the last hidden states; the KL and its gradients are those of the plain formula over every
    position's logits (both models' whole forwards); with a CE term too."""
    batch = batches(1, seed=2)[0]  # (4, 24), row 0 right-padded by 5
    batch["attention_mask"][:, -3:] = 0  # the last 3 positions are padding in every row
    batch["input_ids"][:, 4] = 7  # an ignored id in every row at position 4, and in row 1 at position 9
    batch["input_ids"][1, 9] = 7
    for ce_weight in (0.0, 0.5):
        hybrid, teacher, _ = converted(seed=2)
        module = EndToEndDistillation(
            hybrid.double(),
            teacher=teacher.double(),
            previous_stage=None,
            ignore_token_ids=[7],
            ce_weight=ce_weight,
        )
        projected = []  # positions the head sees, per call
        head = module.hybrid.get_output_embeddings()
        hook = head.register_forward_hook(
            lambda _m, args, _out, seen=projected: seen.append(args[0].shape[:-1].numel())
        )
        losses = module.losses(batch)
        hook.remove()
        # the teacher's then the student's head, on 4 rows x 20 positions (24 minus the 3 padded and the ignored
        # position 4; 9 is real in 3 rows), or on every position for the CE term
        assert projected == ([80, 80] if not ce_weight else [96, 96, 96])
        trainable = [p for p in module.hybrid.parameters() if p.requires_grad]
        grads = torch.autograd.grad(losses["loss"], trainable)
        inputs = module.model_inputs(batch)
        with torch.no_grad(), distillation_mode(module.hybrid, "teacher"):
            teacher_logits = module.hybrid(**inputs, use_cache=False).logits
        with distillation_mode(module.hybrid, "student"):
            student_logits = module.hybrid(**inputs, use_cache=False).logits
        reference = distillation_kl(
            student_logits, teacher_logits, module.valid_tokens(batch), module.temperature
        )
        if ce_weight:
            reference = reference + ce_weight * token_cross_entropy(student_logits, batch["labels"])
        torch.testing.assert_close(losses["loss"], reference, rtol=1e-12, atol=1e-14)
        for grad, reference_grad in zip(grads, torch.autograd.grad(reference, trainable), strict=True):
            torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-14)


def test_head_kl_has_the_values_and_gradients_of_the_logits_kl():
    """`head_distillation_kl` over hidden states and a head, chunked, equals `distillation_kl` over the head's
    logits, and the teacher's side gets no gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 13, bias=False).double()
    student = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 6, dtype=torch.float64)
    valid = torch.rand(3, 7) > 0.3
    chunked = head_distillation_kl(student, teacher, head, valid, 2.0, chunk_tokens=4)
    grads = torch.autograd.grad(chunked, [student, head.weight])
    reference = distillation_kl(head(student), head(teacher).detach(), valid, 2.0)
    expected = torch.autograd.grad(reference, [student, head.weight])
    torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-14)
    for grad, reference_grad in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-12, atol=1e-14)


def test_layerwise_stage_projects_one_position():
    hybrid, teacher, _ = converted(seed=2)
    module = LayerwiseDistillation(hybrid, teacher=teacher, previous_stage=None)
    projected = []
    head = module.hybrid.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[1]))
    module.losses(batches(1)[0])
    hook.remove()
    assert projected == [1]


def test_chunked_kl_has_the_values_and_gradients_of_the_whole():
    student = torch.randn(3, 7, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 13, dtype=torch.float64)
    valid = torch.rand(3, 7) > 0.3
    whole = distillation_kl(student, teacher, valid, 2.0, chunk_tokens=21)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked = distillation_kl(student, teacher, valid, 2.0, chunk_tokens=4)
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-12, atol=1e-14)
    # The same as the plain formula.
    log_t, log_s = teacher.div(2).log_softmax(-1), student.div(2).log_softmax(-1)
    expected = ((log_t.exp() * (log_t - log_s)).sum(-1) * valid).sum() / valid.sum() * 4
    torch.testing.assert_close(whole, expected)


def test_chunked_cross_entropy_has_the_values_and_gradients_of_the_plain_formula():
    logits = torch.randn(3, 7, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (3, 7))
    labels[0, 3:] = -100
    chunked = token_cross_entropy(logits, labels, chunk_tokens=4)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    (grad_plain,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stage", [SupervisedFineTuning, LongSequenceSFT])
@pytest.mark.parametrize("model_type", ["llama", "qwen2_5_vl"])
def test_the_head_in_chunks_gives_the_logits_loss_and_gradients(stage, model_type):
    """SFT's loss through the output head in chunks over the last hidden states (no (T, vocab) logits held) is
    the cross-entropy of the model's logits, in value and in every trainable parameter's gradient (fp64), also
    through peft's wrapper; a model that changes its logits after the head keeps the logits path."""
    hybrid, _, _ = converted(model_type, seed=5)
    options = {"lora_dropout": 0.0} if stage is LongSequenceSFT else {}
    module = stage(hybrid.double(), previous_stage=None, **options)
    batch = batches(1, seed=5, labels_from=6)[0]
    parameters = [p for p in module.hybrid.parameters() if p.requires_grad]
    assert head_is_last(module.hybrid.get_base_model() if stage is LongSequenceSFT else module.hybrid)
    chunked = module.next_token_loss(batch)
    grads = torch.autograd.grad(chunked, parameters)
    logits = module.hybrid(**module.model_inputs(batch), use_cache=False).logits
    expected = token_cross_entropy(logits, batch["labels"])
    expected_grads = torch.autograd.grad(expected, parameters)
    torch.testing.assert_close(chunked, expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
    module.hybrid.config.get_text_config().final_logit_softcapping = 30.0
    assert not head_is_last(module.hybrid.get_base_model() if stage is LongSequenceSFT else module.hybrid)


def test_lora_layers_take_their_input_as_autocast_gives_it():
    """Under mixed precision stage 3's LoRA layers skip peft's cast of their input to the adapters' fp32 dtype (an
    fp32 copy of every adapted layer's input, which autocast casts back to bf16 for the product). Under autocast
    the loss and the adapters' gradients are those of the casting path to the bit (no dropout), and adapters see
    bf16 inputs where the layers before give bf16. The Trainer sets it up for "bf16-mixed", not for "32-true"."""
    hybrid, _, _ = converted(seed=6)
    module = LongSequenceSFT(hybrid, previous_stage=None, lora_dropout=0.0)
    adapters = [m for m in module.hybrid.modules() if isinstance(m, BaseTunerLayer)]
    batch = batches(1, seed=6)[0]
    parameters = [p for p in module.hybrid.parameters() if p.requires_grad]
    seen = []
    hooks = [
        m.lora_A["default"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
        for m in adapters
    ]
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        adapters_follow_autocast(module.hybrid, precision)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.next_token_loss(batch)
        results[precision] = loss, torch.autograd.grad(loss, parameters), set(seen)
    for hook in hooks:
        hook.remove()
    (cast_loss, cast_grads, cast_dtypes), (loss, grads, dtypes) = results["32-true"], results["bf16-mixed"]
    assert cast_dtypes == {torch.float32} and torch.bfloat16 in dtypes
    assert torch.equal(loss, cast_loss)
    for grad, cast_grad in zip(grads, cast_grads, strict=True):
        assert torch.equal(grad, cast_grad)
    for precision in ("bf16-mixed", "32-true"):
        fit(module, 1, batches(1, seed=7), precision=precision)
        assert all(m.cast_input_dtype_enabled == (precision == "32-true") for m in adapters)


def test_kl_is_zero_for_identical_logits_and_masks_tokens():
    logits = torch.randn(2, 5, 11)
    assert distillation_kl(logits, logits, None).abs() < 1e-6
    other = torch.randn(2, 5, 11)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, :2] = False
    masked = distillation_kl(other, logits, valid)
    assert torch.allclose(masked, distillation_kl(other[:, 2:], logits[:, 2:], None))


def test_sft_loss_goes_down_on_the_labelled_tokens_only():
    hybrid, _, _ = converted(seed=3)
    module = SupervisedFineTuning(sharpen_head(hybrid), previous_stage=None, learning_rate=1e-2)
    data = repeat_task_batches(40, seed=3)
    losses = fit(module, 40, data)
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses
    # The loss only sees labelled tokens: changing the logits of unlabelled positions changes nothing.
    batch = data[0]
    unlabelled = batch["labels"].clone()
    unlabelled[:, 10:] = -100  # keep labelled targets up to position 9
    logits = torch.randn(8, 16, 512)
    noisy = logits.clone()
    noisy[:, 9:] += torch.randn_like(noisy[:, 9:])  # logits at t predict labels at t + 1
    ce = hybridize.lightning_modules.token_cross_entropy
    torch.testing.assert_close(ce(logits, unlabelled), ce(noisy, unlabelled))


def test_sft_default_trains_mixers_output_projections_and_mlps():
    hybrid, _, _ = converted(seed=3)
    module = SupervisedFineTuning(hybrid, previous_stage=None)
    trainable = {n for n, p in module.hybrid.named_parameters() if p.requires_grad}
    prefixes = mixer_prefixes(module.hybrid)
    assert trainable == {
        n
        for n, _ in module.hybrid.named_parameters()
        if n.startswith(prefixes) or ".self_attn.o_proj." in n or ".mlp." in n
    }
    assert module.parameter_counts["embeddings"]["trainable"] == 0
    # The vision tower's blocks also have `.mlp.` parameters: patterns never unfreeze them.
    vlm, _, _ = converted("qwen2_5_vl")
    counts = SupervisedFineTuning(vlm, previous_stage=None).parameter_counts
    assert counts["vision"]["trainable"] == 0 and counts["decoder"]["trainable"] > 0


def test_lora_stage_trains_only_adapters_and_merges_back(tmp_path):
    hybrid, _, tokenizer = converted(seed=4)
    module = LongSequenceSFT(
        sharpen_head(hybrid),
        processor=tokenizer,
        previous_stage=None,
        learning_rate=1e-2,
        lora_rank=4,
        lora_dropout=0.0,
    )
    base_before = {n: p.detach().clone() for n, p in module.hybrid.named_parameters() if "lora_" not in n}
    losses = fit(module, 40, repeat_task_batches(40, seed=4))
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses
    trainable = {n for n, p in module.hybrid.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(
        torch.equal(p, base_before[n]) for n, p in module.hybrid.named_parameters() if n in base_before
    )
    inputs = {k: v for k, v in repeat_task_batches(1, seed=5)[0].items() if k != "labels"}
    module.hybrid.eval()
    with torch.no_grad():
        adapted = module.hybrid(**inputs).logits
    out = module.export(tmp_path / "merged")
    reloaded = hybridize.load(out)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        merged = reloaded(**inputs).logits
    # The same function up to fp32 rounding (W + BA against xW + (xA)B, through the x30 head: 3e-6 relative
    # RMS, 3e-5 of the largest logit at worst); without the adapters the logits are off by 1.5 relative RMS.
    assert relative_rms(adapted, merged) < 1e-5
    assert (merged - adapted).abs().max() < 1e-4 * adapted.abs().max()
    assert read_plan(out)["hybridize"]["stages"][-1]["stage"] == "long_sequence_sft"


def test_export_is_loadable_and_records_the_stage(saved_hybrid, tmp_path):
    path, teacher = saved_hybrid
    module = LayerwiseDistillation(path, teacher=teacher, export_dir=str(tmp_path / "stage1a"))
    fit(module, 3, batches(3))
    exported = hybridize.load(tmp_path / "stage1a")
    inputs = {k: v for k, v in batches(1, seed=9)[0].items() if k != "labels"}
    module.hybrid.eval()
    real = inputs["attention_mask"][
        ..., None
    ].bool()  # training attends through flash-window, which leaves padding 0
    with torch.no_grad(), distillation_mode(module.hybrid, "student"):
        expected = module.hybrid(**inputs).logits
        torch.testing.assert_close(exported(**inputs).logits * real, expected * real)
    (entry,) = read_plan(tmp_path / "stage1a")["hybridize"]["stages"]
    assert entry["stage"] == "layerwise_distillation" and entry["steps"] == 3
    # The next stage takes it; a stage that expects another predecessor refuses it.
    EndToEndDistillation(str(tmp_path / "stage1a"), teacher=teacher)
    with pytest.raises(
        ValueError, match="output of 'end_to_end_distillation'.*output of 'layerwise_distillation'"
    ):
        SupervisedFineTuning(str(tmp_path / "stage1a"))


def test_wrong_or_missing_previous_stage_is_an_error(saved_hybrid, tmp_path):
    path, teacher = saved_hybrid
    with pytest.raises(ValueError, match="output of 'layerwise_distillation'.*output of 'convert'"):
        EndToEndDistillation(str(path), teacher=teacher)
    with pytest.raises(FileNotFoundError, match="does not exist. Run the previous stage first"):
        EndToEndDistillation(str(tmp_path / "no-such-stage"), teacher=teacher)


def test_a_checkpoint_with_another_plan_is_refused_before_loading(saved_hybrid):
    path, teacher = saved_hybrid
    with pytest.raises(
        ValueError, match=r"does not have the plan.*layer 2: gated_deltanet \(expected sliding_window\)"
    ):
        LayerwiseDistillation(str(path), teacher=teacher, plan={"ratio": "1/2", "window": 4096})
    with pytest.raises(ValueError, match=r"sliding_window.window = 4096 \(expected 8192\)"):
        LayerwiseDistillation(str(path), teacher=teacher, plan={"ratio": "1/4", "window": 8192})
    LayerwiseDistillation(str(path), teacher=teacher, plan={"ratio": "1/4", "window": 4096})


def test_another_teacher_is_refused(saved_hybrid):
    path, _ = saved_hybrid
    with pytest.raises(ValueError, match="not the model this hybrid was converted from"):
        LayerwiseDistillation(str(path), teacher=tiny_model("llama", seed=7, num_hidden_layers=LAYERS))
    with pytest.raises(ValueError, match="not this hybrid's teacher"):
        attach_teacher(converted()[0], tiny_model("llama", num_hidden_layers=LAYERS + 1))


def test_distillation_refuses_to_train_the_teachers_weights(saved_hybrid):
    path, teacher = saved_hybrid
    with pytest.raises(ValueError, match=r"only the mixers can train.*\['decoder'\]"):
        LayerwiseDistillation(str(path), teacher=teacher, trainable=["mixers", r"\.mlp\."])
    with pytest.raises(ValueError, match="No parameter matches"):
        LayerwiseDistillation(str(path), teacher=teacher, trainable=["no_such_parameter"])


def test_export_dir_is_refused_up_front(saved_hybrid, tmp_path):
    path, teacher = saved_hybrid
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        LayerwiseDistillation(str(path), teacher=teacher, export_dir=str(tmp_path / "taken"))


def test_checkpoints_hold_only_the_trainable_parameters(saved_hybrid):
    path, teacher = saved_hybrid
    module = LayerwiseDistillation(str(path), teacher=teacher)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(".self_attn.student." in key for key in checkpoint["state_dict"])


class Crash(L.Callback):
    """Kills the run after `step` optimizer steps, like a lost node (Lightning runs checkpoint callbacks last,
    so the crash comes at the start of the next batch, after step `step` was saved)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("node lost")


def test_resume_continues_at_the_saved_step_with_the_optimizer_state(saved_hybrid, tmp_path):
    path, teacher = saved_hybrid
    data = batches(5, seed=6)  # one epoch = 5 steps; the crash comes at the end of the first epoch

    def run(ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        module = LayerwiseDistillation(str(path), teacher=teacher, learning_rate=3e-3, warmup_ratio=0.2)
        run_trainer = trainer(10, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        run_trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
        return module, run_trainer

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_last=True
    )
    with pytest.raises(RuntimeError, match="node lost"):
        run(callbacks=[checkpoints, Crash(5)])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5
    assert saved["state_dict"] and all(".self_attn.student." in key for key in saved["state_dict"])
    resumed, resumed_trainer = run(ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    straight, _ = run()
    assert resumed_trainer.global_step == 10
    for (name, p), q in zip(resumed.hybrid.named_parameters(), straight.hybrid.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # A checkpoint of another stage cannot be resumed here.
    other, other_teacher, _ = converted()
    with pytest.raises(ValueError, match="saved by stage 'layerwise_distillation'"):
        EndToEndDistillation(other, teacher=other_teacher, previous_stage=None).on_load_checkpoint(saved)


def test_learning_rate_schedule_warms_up_then_decays(saved_hybrid):
    path, teacher = saved_hybrid
    module = LayerwiseDistillation(str(path), teacher=teacher, warmup_ratio=0.1, min_learning_rate_ratio=0.1)
    factors = [module.learning_rate_factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="warmup_ratio"):
        LayerwiseDistillation(str(path), teacher=teacher, warmup_ratio=1.5)


def test_a_stream_without_max_steps_is_refused_before_training(saved_hybrid):
    """A stream has no length: the schedule would have no end (it decayed over one step), so fit stops first."""
    path, teacher = saved_hybrid
    module = LayerwiseDistillation(str(path), teacher=teacher)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"input_ids": torch.randint(0, 100, (1, 16))}

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        trainer.fit(module, torch.utils.data.DataLoader(Stream(), batch_size=None))


def test_the_recorded_base_model_is_the_default_teacher(tmp_path):
    teacher, tokenizer = hybridize.load_base_model("tiny-llama")
    hybrid, _ = hybridize.convert(teacher, hybridize.plan_layers(8, "1/4", window=64), progress=False)
    path = save_hybrid(hybrid, tmp_path / "converted", tokenizer)
    module = LayerwiseDistillation(str(path))  # loads tiny-llama, recorded by the conversion
    assert module.parameter_counts["teacher attention"]["frozen"] > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        hybrid, teacher, _ = converted(seed=1)
        module = EndToEndDistillation(
            hybrid.double(),
            teacher=teacher.double(),
            previous_stage=None,
            gradient_checkpointing=checkpointing,
        )
        assert module.hybrid.is_gradient_checkpointing == checkpointing
        module.losses(batches(1)[0])["loss"].backward()
        grads.append({n: p.grad for n, p in module.hybrid.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_a_finished_run_leaves_its_process_group(tmp_path):
    """LeaveProcessGroup (the spawned selection workers' last hook; `hybridize train` calls the same at its end):
    the rank leaves the default process group after a barrier, so no rank tears it down at exit after rank 0
    (which holds its store) has gone; without a group it does nothing."""
    hook = LeaveProcessGroup()
    hook.teardown(None, None, "fit")  # no process group: nothing to leave
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        hook.teardown(None, None, "fit")
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
