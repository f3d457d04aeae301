"""`hybridize select`: the methods rank a known lookup layer first, the plan flows through convert and a training
stage unchanged, a rerun resumes, and bad input is refused before anything loads or is written."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hybridize import cli
from hybridize.compat import attention_implementation
from hybridize.converters import read_plan
from hybridize.converters.discovery import find_decoder_layout
from hybridize.selection import SelectionSettings, get_method, select_layers
from hybridize.selection.methods import NllMethod
from hybridize.selection.select import SelectionRun
from hybridize.testing.synthetic import write_synthetic_chat_data

RECALL = Path(__file__).resolve().parents[2] / "examples" / "recall"
sys.path.insert(0, str(RECALL))

from mqar import MQARBatches  # noqa: E402
from sweep import SETTINGS, load_teacher  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "infinitevl"
# The shipped 2-layer MQAR teacher: layer 0 binds each value to its key, layer 1 looks keys up.
LOOKUP_LAYER = 1


def previous_token_attention(model: LlamaForCausalLM, layer_idx: int, length: int) -> None:
    """Make layer `layer_idx`'s attention look at nothing but the token before each query: q/k weights zero, so
    the scores depend on positions alone, and q/k biases fitted through the model's own rotary embedding to put
    every query's weight on its predecessor."""
    config, attention = model.config, model.model.layers[layer_idx].self_attn
    head_dim = attention.head_dim
    positions = torch.arange(length)
    cos, sin = model.model.rotary_emb(torch.zeros(1, length, config.hidden_size), positions[None])
    causal = positions[:, None] >= positions[None, :]

    def log_weights(bias_q, bias_k):  # (L, L): every head sees the same position-only scores
        q, k = apply_rotary_pos_emb(
            bias_q.expand(1, 1, length, -1), bias_k.expand(1, 1, length, -1), cos, sin
        )
        scores = (q @ k.transpose(-1, -2))[0, 0] * attention.scaling
        return scores.masked_fill(~causal, float("-inf")).log_softmax(-1)

    generator = torch.Generator().manual_seed(0)
    biases = [torch.randn(head_dim, generator=generator).requires_grad_() for _ in range(2)]
    optimizer = torch.optim.Adam(biases, lr=0.1)
    rows = positions[1:]
    for _ in range(400):
        loss = -log_weights(*biases)[rows, rows - 1].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        attention.q_proj.weight.zero_()
        attention.k_proj.weight.zero_()
        attention.q_proj.bias.copy_(biases[0].repeat(config.num_attention_heads))
        attention.k_proj.bias.copy_(biases[1].repeat(config.num_key_value_heads))


@pytest.fixture(scope="module")
def recall_teacher():
    return constructed_teacher()


def constructed_teacher():
    """A constructed teacher: the shipped MQAR teacher with its binding layer (0) made to see only the previous
    token, by position alone; its lookup layer (1) is the only one that can look back. It still answers most
    queries (the binding it learned was mostly that)."""
    setting = SETTINGS["cpu"]
    trained = load_teacher(RECALL / "teachers" / "cpu", setting)
    config = copy.deepcopy(trained.config)
    config.attention_bias = True
    teacher = LlamaForCausalLM(config)
    teacher.load_state_dict(trained.state_dict(), strict=False)  # the biases are new
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    previous_token_attention(teacher, 0, setting.task.seq_len)
    batches = [MQARBatches(setting.task, 48, 16, seed=5)[i] for i in range(48)]
    return teacher.eval(), batches


def test_only_the_lookup_layer_looks_back(recall_teacher):
    """The premise of the ranking test: layer 0 puts all but 1e-3 of every query's weight on the token before
    it; layer 1, where a key is asked again, attends far back to its pair; the teacher still answers most."""
    teacher, batches = recall_teacher
    inputs = {key: batches[0][key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad(), attention_implementation(teacher.config, "eager"):
        outputs = teacher(**inputs, output_attentions=True)
    length = inputs["input_ids"].shape[1]
    distance = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).float()  # query - key
    # (B, heads, L - 1): the weight of query i + 1 on key i
    previous = outputs.attentions[0].diagonal(offset=-1, dim1=-2, dim2=-1)
    assert float(previous.min()) > 0.999
    labels = batches[0]["labels"]
    queries = torch.zeros_like(labels, dtype=torch.bool)
    queries[:, :-1] = labels[:, 1:] != -100  # the logits at a query predict the next label
    reach = (outputs.attentions[LOOKUP_LAYER] * distance).sum(-1).mean(1)[queries]
    assert float(reach.mean()) > 10, reach
    answers = outputs.logits[:, :-1].argmax(-1)[queries[:, :-1]]
    assert float((answers == labels[:, 1:][queries[:, :-1]]).float().mean()) > 0.7


@pytest.mark.parametrize("method", ["mse", "nll", "kl"])
def test_every_method_but_uniform_ranks_the_lookup_layer_first(recall_teacher, method):
    teacher, batches = recall_teacher
    # A window that covers the task's distances (72 tokens): keeping softmax attention is worth most where the
    # teacher looks back.
    settings = SelectionSettings(
        method=method, budget=1, window=64, eval_batches=2, learning_rate=3e-3, align_steps=100,
        train_steps=10 if method == "kl" else None,
    )  # fmt: skip
    result = select_layers(teacher, batches, settings, progress=False)
    assert result.softmax_layers == [LOOKUP_LAYER], result.scores
    assert result.scores[LOOKUP_LAYER] > result.scores[0]
    assert result.tokens > 0


def test_two_processes_train_and_rank_like_one():
    """devices=2: the alignment runs in two spawned DDP processes (gloo on CPU), each on its own batches, and its
    weights come back to this process, which ranks the lookup layer first as one process does."""
    # Its own teacher: one that ran with output_attentions carries transformers' capture hooks, which do not pickle.
    teacher, batches = constructed_teacher()
    settings = SelectionSettings(
        method="mse", budget=1, window=64, eval_batches=2, learning_rate=3e-3, align_steps=40, devices=2
    )
    run = SelectionRun(teacher, batches, settings, progress=False)
    untrained = run.hybrid([], aligned=False)
    aligned = run.aligned_mixers()
    changed = [
        name
        for name, value in find_decoder_layout(untrained).attention(0).state_dict().items()
        if not torch.allclose(value.float(), aligned[0][name])
    ]
    assert changed, "the spawned alignment's weights did not come back"
    result = select_layers(teacher, batches, settings, progress=False)
    assert result.softmax_layers == [LOOKUP_LAYER], result.scores


def test_a_teacher_that_cannot_be_spawned_is_one_line():
    teacher, batches = constructed_teacher()
    with torch.no_grad(), attention_implementation(teacher.config, "eager"):
        teacher(
            input_ids=batches[0]["input_ids"], output_attentions=True
        )  # leaves transformers' capture hooks
    settings = SelectionSettings(method="mse", budget=1, window=64, eval_batches=2, align_steps=2, devices=2)
    with pytest.raises(ValueError, match="cannot be sent to spawned training processes.*devices=1"):
        select_layers(teacher, batches, settings, progress=False)


def test_uniform_is_the_recipes_interleave(recall_teacher):
    teacher, batches = recall_teacher
    settings = SelectionSettings(method="uniform", budget=1, window=64, eval_batches=1)
    assert select_layers(teacher, batches, settings, progress=False).softmax_layers == [0]


def test_a_rerun_skips_the_layers_already_scored(recall_teacher, tmp_path, monkeypatch):
    teacher, batches = recall_teacher
    settings = SelectionSettings(method="nll", budget=1, window=64, eval_batches=1, align_steps=3)
    scored = []
    original = NllMethod.score

    def interrupted(self, run, chosen, layers):
        for idx, value in original(self, run, chosen, layers):
            scored.append(idx)
            yield idx, value
            raise KeyboardInterrupt  # killed after the first layer's score is saved

    monkeypatch.setattr(NllMethod, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        select_layers(teacher, batches, settings, out=tmp_path / "sel", progress=False)
    assert not (tmp_path / "sel" / "plan.yaml").exists()
    monkeypatch.setattr(NllMethod, "score", original)
    resumed = select_layers(teacher, batches, settings, out=tmp_path / "sel", progress=False)
    fresh = select_layers(teacher, batches, settings, out=tmp_path / "fresh", progress=False)
    assert scored == [0]
    assert resumed.scores == pytest.approx(fresh.scores, rel=1e-5)
    report = json.loads((tmp_path / "sel" / "scores.json").read_text())
    assert (
        report["softmax_layers"] == resumed.softmax_layers
        and (tmp_path / "sel" / "scores.png").stat().st_size
    )


def test_a_user_method_registers_and_runs(recall_teacher):
    from hybridize.selection import SelectionMethod, register_method
    from hybridize.selection.methods import METHODS

    @register_method
    class LastLayers(SelectionMethod):
        name = "last_layers_test"

        def score(self, run, chosen, layers):
            yield from ((idx, float(idx)) for idx in layers)

    try:
        teacher, batches = recall_teacher
        settings = SelectionSettings(method="last_layers_test", budget=1, window=64, eval_batches=1)
        assert select_layers(teacher, batches, settings, progress=False).softmax_layers == [1]
    finally:
        del METHODS["last_layers_test"]
    with pytest.raises(ValueError, match="not one of"):
        get_method("last_layers_test")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_synthetic_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl", 24, seed=0)


def select_command(out, data, *extra):
    return ["select", "--base", "tiny-qwen2.5-vl", "--data", str(data), "--window", "16", "--eval-batches", "2",
            "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def test_the_plan_flows_through_convert_and_a_training_stage(chat_data, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["hybridize"])
    plan = tmp_path / "sel" / "plan.yaml"
    assert cli.main(select_command(tmp_path / "sel", chat_data, "--budget", "2", "--method", "mse",
                                   "--align-steps", "2")) == 0  # fmt: skip
    chosen = yaml.safe_load(plan.read_text())["swa_layers"]
    assert len(chosen) == 2
    converted = tmp_path / "converted"
    assert (
        cli.main(["convert", "--base", "tiny-qwen2.5-vl", "--layers", str(plan), "--out", str(converted)])
        == 0
    )
    layers = read_plan(converted)["hybridize"]["layers"]
    assert [idx for idx, name in enumerate(layers) if name == "sliding_window"] == chosen
    export = tmp_path / "stage1" / "hybrid"
    assert cli.main(
        ["train", "--config", str(CONFIGS / "stage1_layerwise.yaml"),
         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "1",
         "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path / "stage1"),
         "--model.init_args.checkpoint", str(converted), "--model.init_args.dtype", "null",
         "--model.init_args.plan", str(plan), "--model.init_args.export_dir", str(export),
         "--data.init_args.train_files", f"[{chat_data}]", "--data.init_args.num_workers", "0",
         "--data.init_args.max_length", "256"]
    ) == 0  # fmt: skip
    assert read_plan(export)["hybridize"]["layers"] == layers
    # A plan file and a ratio at once is a contradiction, not an override.
    with pytest.raises(SystemExit):
        cli.main(["convert", "--base", "tiny-qwen2.5-vl", "--layers", str(plan), "--ratio", "1/4",
                  "--out", str(tmp_path / "other")])  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "9"], "the model has 0..8"),
        (["--budget", "-1"], "the model has 0..8"),
        (["--budget", "1/3"], "whole number of layers"),
        (["--budget", "2", "--method", "magic"], "method 'magic' is not one of"),
        (["--budget", "2", "--window", "4096"], "too short for the window"),
        (["--budget", "2", "--method", "nll", "--greedy"], "no greedy re-scoring"),
        (["--budget", "2", "--devices", "0"], "devices must be a whole number >= 1"),
    ],
)
def test_bad_input_is_one_line_before_loading(chat_data, tmp_path, monkeypatch, capsys, extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the input was checked")

    monkeypatch.setattr("hybridize.converters.checkpoint.load_base_model", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(select_command(tmp_path / "sel", chat_data, *extra))
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the data check's progress bar
    assert exit_info.value.code == 2 and error.startswith("hybridize select: error:") and message in error, (
        error
    )
    assert not (tmp_path / "sel").exists()


def test_a_nonempty_out_is_refused(chat_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sel"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(select_command(out, chat_data, "--budget", "2"))
    assert "is not empty" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
