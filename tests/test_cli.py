"""`hybridize convert / inspect / generate` end to end on the embedded tiny model, and their input errors."""

from __future__ import annotations

import json

import pytest

from hybridize.cli import main
from tests.conftest import make_image


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-ivl"
    assert (
        main(["convert", "--base", "tiny-qwen2.5-vl", "--ratio", "1/4", "--window", "16", "--out", str(out)])
        == 0
    )
    return out


def test_convert_writes_a_loadable_hybrid(converted, capsys):
    plan = json.loads((converted / "config.json").read_text())["hybridize"]
    assert plan["layers"][:4] == ["sliding_window", "gated_deltanet", "gated_deltanet", "gated_deltanet"]
    assert plan["mixers"]["gated_deltanet"]["init"] == "mimic"
    assert (converted / "tokenizer.json").exists() or (converted / "tokenizer_config.json").exists()


def test_inspect_prints_the_plan(converted, capsys):
    assert main(["inspect", str(converted)]) == 0
    out = capsys.readouterr().out
    assert (
        "hybrid_qwen2_5_vl (from tiny-qwen2.5-vl)" in out
        and "gated_deltanet" in out
        and '"window": 16' in out
    )


def test_generate_with_an_image(converted, tmp_path, capsys):
    image = tmp_path / "picture.png"
    make_image(5, (84, 56)).save(image)
    args = [
        "generate",
        str(converted),
        "--prompt",
        "What is this?",
        "--image",
        str(image),
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    reply = capsys.readouterr().out
    assert main([*args, "--static-decode"]) == 0  # the static cache's decode gives generate()'s tokens
    assert capsys.readouterr().out == reply


def test_convert_with_attention_transfer_and_explicit_layers(tmp_path):
    out = tmp_path / "explicit"
    args = [
        "convert",
        "--base",
        "tiny-qwen2.5-vl",
        "--swa-layers",
        "0,7",
        "--init",
        "attention_transfer",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    plan = json.loads((out / "config.json").read_text())["hybridize"]
    assert [i for i, name in enumerate(plan["layers"]) if name == "sliding_window"] == [0, 7]
    assert plan["mixers"]["gated_deltanet"]["init"] == "attention_transfer"


def non_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    return str(tmp_path / "out")


def not_a_model(tmp_path):
    (tmp_path / "empty-model").mkdir()
    return str(tmp_path / "empty-model")


def unsupported_model(tmp_path):
    (tmp_path / "gpt2").mkdir()
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "gpt2")


BAD_INPUTS = [
    (["--ratio", "3/2"], "between 0 and 1"),
    (["--ratio", "-1"], "between 0 and 1"),
    (["--ratio", "abc"], "not a number"),
    (["--ratio", "1/4", "--window", "0"], "--window must be a positive"),
    (
        ["--ratio", "1/4", "--mixer", "retnet"],
        "registered mixers: full_attention, gated_deltanet, gla, mamba2",
    ),
    (["--ratio", "1/4", "--init", "random"], "--init 'random'"),
    (["--ratio", "1/4", "--dtype", "int8"], "dtype 'int8'"),
    (["--swa-layers", "0,99"], "outside the model's layers"),
    ([], "Give a ratio"),
    (["--layers", "0-3:sliding_window,2:mamba2"], "layer 2 is given twice"),
    (["--layers", "0-9:mamba2"], "[8, 9] are outside the model's layers 0..7"),
    (["--layers", "missing.yaml"], "--layers file 'missing.yaml' does not exist"),
    (["--ratio", "1/4", "--option", "expand_v=1"], "is not MIXER.KEY=VALUE"),
    (["--ratio", "1/4", "--option", "gated_deltanet.heads=2"], "Unknown option(s) ['heads']"),
    (["--ratio", "1/4", "--option", "mamba2.num_groups=2"], "no layer of the plan uses"),
    (["--ratio", "1/4", "--mixer", "mamba2", "--option", "mamba2.num_groups=3"], "num_groups"),
    (
        ["--ratio", "1/4", "--init", "attention_transfer", "--option", "gated_deltanet.num_heads=2"],
        "mixer 'gated_deltanet' (layers [1, 2, 3, 5, 6, 7]): gated_deltanet init='attention_transfer' needs num_heads == 4",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_convert_arguments_fail_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--base", "tiny-qwen2.5-vl", *args, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (lambda tmp: str(tmp / "does-not-exist"), "is not a directory"),
        (not_a_model, "no config.json"),
        (
            unsupported_model,
            "(gpt2) cannot be converted: The decoder of GPT2LMHeadModel (GPT2Model) has no `layers`",
        ),
    ],
)
def test_bad_base_models(tmp_path, capsys, base, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        main(["convert", "--base", base(tmp_path), "--ratio", "1/4", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_non_empty_out_needs_overwrite_and_overwrite_replaces_only_a_hybrid(tmp_path, capsys):
    out = non_empty(tmp_path)
    for extra in ([], ["--overwrite"]):  # a folder of other files is refused even with --overwrite
        with pytest.raises(SystemExit):
            main(["convert", "--base", "tiny-qwen2.5-vl", "--ratio", "1/4", "--out", out, *extra])
        assert "--overwrite" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]

    vl = str(tmp_path / "vl")
    assert main(["convert", "--base", "tiny-qwen2.5-vl", "--ratio", "1/4", "--out", vl]) == 0
    assert (tmp_path / "vl" / "processor_config.json").exists()
    assert main(["convert", "--base", "tiny-llama", "--ratio", "1/4", "--out", vl, "--overwrite"]) == 0
    assert not (tmp_path / "vl" / "processor_config.json").exists()  # nothing of the VL hybrid survives
    assert json.loads((tmp_path / "vl" / "config.json").read_text())["model_type"] == "hybrid_llama"
    assert main(["generate", vl, "--prompt", "hi", "--max-new-tokens", "2"]) == 0


def test_inspect_and_generate_reject_non_hybrids(tmp_path, capsys):
    for verb in (["inspect", str(tmp_path)], ["generate", str(tmp_path), "--prompt", "hi"]):
        with pytest.raises(SystemExit):
            main(verb)
        assert "config.json" in capsys.readouterr().err


def test_convert_with_a_layer_map_several_mixers_and_options(tmp_path):
    layers = tmp_path / "layers.yaml"
    layers.write_text(
        "\n".join(f"- {name}" for name in ["sliding_window", "mamba2", "gla", "gated_deltanet"] * 2)
    )
    out = tmp_path / "mixed"
    args = ["convert", "--base", "tiny-llama", "--layers", str(layers), "--window", "8"]
    args += ["--option", "gated_deltanet.expand_v=1", "--init", "mimic", "--out", str(out)]
    assert main(args) == 0
    plan = json.loads((out / "config.json").read_text())["hybridize"]
    assert plan["layers"] == ["sliding_window", "mamba2", "gla", "gated_deltanet"] * 2
    assert plan["mixers"]["gated_deltanet"]["expand_v"] == 1
    assert plan["mixers"]["mamba2"]["init"] == plan["mixers"]["gla"]["init"] == "mimic"
    assert plan["mixers"]["sliding_window"]["window"] == 8


def test_mixers_lists_options_and_compute_paths(capsys):
    assert main(["mixers"]) == 0
    out = capsys.readouterr().out
    for name in ("gated_deltanet", "mamba2", "gla", "sliding_window", "full_attention"):
        assert f"{name}  (" in out
    assert "torch (reference)" in out and "expand_v=2.0" in out
    assert main(["mixers", "--json"]) == 0
    described = {mixer["name"]: mixer for mixer in json.loads(capsys.readouterr().out)}
    assert described["gated_deltanet"]["options"]["num_heads"] == "from teacher"
    assert described["mamba2"]["compute_paths"]["torch (reference)"] is True
    assert set(described["mamba2"]["compute_paths"]) == {"torch (reference)", "mamba_ssm", "fla"}
