"""InfiniteVL's released checkpoints load without remote code: a checkpoint written in their format (their config
fields, legacy key layout, two shards, tied head left out, bf16 A_log/dt_bias) imports into a hybrid that computes
what the hybrid built from the same tensors by hand does, generates, and round-trips through hybridize's format."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen3_next import modeling_qwen3_next

import hybridize
from hybridize.converters import convert, hybrid_model_class, load_processor, plan_layers
from hybridize.converters.infinitevl import (
    import_infinitevl,
    infinitevl_config,
    infinitevl_plan,
    is_infinitevl_checkpoint,
    load_infinitevl,
)
from hybridize.inference.chat import chat_inputs
from hybridize.lightning_modules.stage import check_plan, check_previous_stage
from hybridize.mixers.gated_deltanet import GatedDeltaNetMixer
from hybridize.presets import (
    VISION_TOKEN_IDS,
    qwen2_5_vl_3b_config,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
)
from hybridize.testing import greedy_decode_without_cache
from tests.conftest import make_image

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

LAYERS = 8
WINDOW = 8
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
# Their class defaults (absent from the released config.json) as our gated_deltanet options.
RELEASED_LINEAR = {"num_heads": 16, "head_k_dim": 128, "expand_v": 2.0, "conv_size": 4, "norm_eps": 1e-5}
# The tiny checkpoint states only its sizes (16 heads of 128 would make the CPU tests slow); expand_v, conv_size,
# norm_eps, use_gate are left out, so their defaults apply.
TINY_SIZES = {"num_linear_heads": 4, "num_linear_key_value_heads": 4, "linear_head_dim": 16}
TINY_LINEAR = {**RELEASED_LINEAR, "num_heads": 4, "head_k_dim": 16}


def their_config(config, **fields) -> dict:
    """config.json as InfiniteVL writes it for a Qwen2.5-VL config: text fields at the top level, M-RoPE as
    rope_scaling, their vision model_type, no linear fields unless given."""
    text = config.text_config.to_dict()
    rope = text["rope_parameters"]
    vision = {**config.vision_config.to_dict(), "model_type": "infinite_vl", "in_chans": 3}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id")
    return {
        "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
        "model_type": "infinite_vl",
        "attn_implementation": "flash_attention_2",
        **{key: text[key] for key in keys},
        "eos_token_id": text["eos_token_id"],
        "max_window_layers": 70,
        "rope_scaling": {"mrope_section": rope["mrope_section"], "rope_type": "default", "type": "default"},
        "rope_theta": rope["rope_theta"],
        "sliding_window": WINDOW,
        "use_sliding_window": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.50.0",
        "use_cache": False,
        "vision_config": vision,
        **VISION_TOKEN_IDS,
        **fields,
    }


def hand_built_hybrid(plan):
    """The hybrid their checkpoint should become, built with hybridize from a tied tiny Qwen2.5-VL, every
    Gated DeltaNet tensor random (A_log and dt_bias rounded to bf16, as they may be stored)."""
    config = tiny_qwen2_5_vl_config(LAYERS)
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = Qwen2_5_VLForConditionalGeneration(config).eval()
        hybrid, _ = convert(teacher, plan, progress=False)
        with torch.no_grad():
            for mixer in (m for m in hybrid.modules() if isinstance(m, GatedDeltaNetMixer)):
                mixer.reset_parameters()
                mixer.o_norm.weight.uniform_(0.5, 1.5)
                for parameter in (mixer.A_log, mixer.dt_bias):
                    parameter.copy_(parameter.bfloat16())
    return hybrid, config


def legacy_key(name: str) -> str:
    """Our tensor names in the layout transformers 4.x saves Qwen2.5-VL in (theirs)."""
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name.replace("model.language_model.", "model.", 1)


def write_their_checkpoint(hybrid, folder, config: dict, *, legacy: bool = True) -> None:
    """Their files: config.json, two shards with an index (legacy layout) or one file, no tied lm_head."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in hybrid.state_dict().items():
        if name == "lm_head.weight":
            continue
        stored = tensor.bfloat16() if name.endswith(("A_log", "dt_bias")) else tensor
        state[legacy_key(name) if legacy else name] = stored.detach().clone().contiguous()
    keys = list(state)
    if legacy:
        halves = {SHARDS[0]: keys[: len(keys) // 2], SHARDS[1]: keys[len(keys) // 2 :]}
        for file, names in halves.items():
            save_file({key: state[key] for key in names}, folder / file)
        weight_map = {key: file for file, names in halves.items() for key in names}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    tiny_qwen2_5_vl_processor().save_pretrained(folder)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(folder in their format, the hybrid built by hand): the released config's fields, tiny sizes."""
    plan = plan_layers(LAYERS, "1/4", window=WINDOW, options={"gated_deltanet": TINY_LINEAR})
    hybrid, config = hand_built_hybrid(plan)
    folder = tmp_path_factory.mktemp("infinitevl")
    write_their_checkpoint(hybrid, folder, their_config(config, **TINY_SIZES))
    return folder, hybrid


@pytest.fixture(scope="module")
def imported(released):
    return load_infinitevl(released[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def batch():
    processor = tiny_qwen2_5_vl_processor()
    return chat_inputs(processor, ["What is shown?", "Hello there"], [[make_image(1)], []])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_released_config_becomes_the_infinitevl_plan():
    """The released 4B config.json leaves the linear fields out: their class defaults give InfiniteVL's layer,
    whose tensors have the shapes of their checkpoint."""
    released = their_config(qwen2_5_vl_3b_config(), sliding_window=8192)
    plan = infinitevl_plan(released)
    assert plan.layers == ["sliding_window", "gated_deltanet", "gated_deltanet", "gated_deltanet"] * 9
    assert plan.mixers == {"sliding_window": {"window": 8192}, "gated_deltanet": RELEASED_LINEAR}
    config = infinitevl_config(released)
    text = config.text_config
    assert text.use_sliding_window and text.sliding_window == 8192 and config.tie_word_embeddings
    # The linear layers are module swaps; the config only knows the sliding ones.
    assert text.layer_types == ["sliding_attention", *["full_attention"] * 3] * 9
    with torch.device("meta"):
        model = hybrid_model_class(Qwen2_5_VLForConditionalGeneration)._from_config(config)
    shapes = {
        name.split("self_attn.")[1]: list(t.shape)
        for name, t in model.state_dict().items()
        if ".1.self_attn." in name and "language_model" in name
    }
    assert shapes == {
        "A_log": [16],
        "dt_bias": [16],
        "q_proj.weight": [2048, 2048],
        "k_proj.weight": [2048, 2048],
        "v_proj.weight": [4096, 2048],
        "a_proj.weight": [16, 2048],
        "b_proj.weight": [16, 2048],
        "q_conv1d.weight": [2048, 1, 4],
        "k_conv1d.weight": [2048, 1, 4],
        "v_conv1d.weight": [4096, 1, 4],
        "g_proj.weight": [4096, 2048],
        "o_norm.weight": [256],
        "o_proj.weight": [2048, 4096],
    }


def test_detects_their_checkpoints(released, tmp_path):
    folder, hybrid = released
    assert is_infinitevl_checkpoint(folder)
    hybridize.save_hybrid(hybrid, tmp_path / "ours")
    assert not is_infinitevl_checkpoint(tmp_path / "ours")
    assert not is_infinitevl_checkpoint(tmp_path / "nothing")


def test_imported_model_equals_the_hand_built_hybrid(released, imported, batch):
    _, hybrid = released
    assert type(imported).__name__ == "HybridQwen2_5_VLForConditionalGeneration"
    assert imported.lm_head.weight is imported.model.language_model.embed_tokens.weight
    torch.testing.assert_close(logits(imported, batch), logits(hybrid, batch))


def test_new_key_layout_in_one_file_loads_the_same(released, batch, tmp_path):
    _, hybrid = released
    config = their_config(tiny_qwen2_5_vl_config(LAYERS), **TINY_SIZES)
    write_their_checkpoint(hybrid, tmp_path, config, legacy=False)
    torch.testing.assert_close(logits(load_infinitevl(tmp_path), batch), logits(hybrid, batch))


@pytest.mark.skipif(
    importlib.util.find_spec("fla") is not None,
    reason="with fla installed transformers routes its torch reference through fla's Triton kernels",
)
def test_linear_layers_compute_their_formula(released, imported):
    """One Gated DeltaNet layer of the import against InfiniteVL's layer written out from their tensors:
    silu(causal conv) on q, k, v; q, k L2-normalised; g = -exp(A_log) softplus(a + dt_bias); beta = sigmoid(b);
    out = o_proj(o_norm.weight * rmsnorm(o, 1e-5) * silu(g_proj x)) per head (expand_v 2)."""
    folder, _ = released
    weights = {**load_file(folder / SHARDS[0]), **load_file(folder / SHARDS[1])}
    w = {
        key.split("self_attn.")[1]: t.float()
        for key, t in weights.items()
        if "model.layers.1.self_attn." in key
    }
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(0))

    def conv(projected, weight):  # (B, T, D) -> (B, T, D), causal depthwise, then SiLU
        padded = F.pad(projected.transpose(1, 2), (weight.shape[-1] - 1, 0))
        return F.silu(F.conv1d(padded, weight, groups=weight.shape[0])).transpose(1, 2)

    q = conv(x @ w["q_proj.weight"].T, w["q_conv1d.weight"]).unflatten(-1, (4, 16))
    k = conv(x @ w["k_proj.weight"].T, w["k_conv1d.weight"]).unflatten(-1, (4, 16))
    v = conv(x @ w["v_proj.weight"].T, w["v_conv1d.weight"]).unflatten(-1, (4, 32))
    beta = (x @ w["b_proj.weight"].T).sigmoid()
    g = -w["A_log"].exp() * F.softplus(x @ w["a_proj.weight"].T + w["dt_bias"])
    o, _ = modeling_qwen3_next.torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, use_qk_l2norm_in_kernel=True
    )
    gate = (x @ w["g_proj.weight"].T).unflatten(-1, (4, 32))
    o = w["o_norm.weight"] * F.rms_norm(o, (32,), eps=1e-5) * F.silu(gate)
    expected = o.flatten(-2) @ w["o_proj.weight"].T

    mixer = imported.model.language_model.layers[1].self_attn
    assert mixer.o_norm.eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden_states=x)[0], expected, rtol=1e-4, atol=1e-5)


def test_generates_the_uncached_greedy_tokens(released):
    # float64, so that chunked (prefill) and recurrent (decode) rounding cannot flip a near-tie argmax
    model = load_infinitevl(released[0], dtype=torch.float64)
    inputs = chat_inputs(tiny_qwen2_5_vl_processor(), ["Describe the image."], [[make_image(2)]])
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, greedy_decode_without_cache(model, inputs, 6))


def test_import_round_trips_and_chains_into_stage_3(released, imported, batch, tmp_path):
    folder, _ = released
    out = import_infinitevl(folder, tmp_path / "imported")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_infinitevl(folder, out)
    import_infinitevl(folder, out, overwrite=True)
    assert torch.equal(logits(hybridize.load(out), batch), logits(imported, batch))
    assert load_processor(out) is not None

    section = json.loads((out / "config.json").read_text())["hybridize"]
    assert section["stages"] == [{"stage": "supervised_fine_tuning", "imported_from": str(folder)}]
    check_previous_stage(section, "supervised_fine_tuning", "long_sequence_sft", str(out))
    check_plan(
        hybridize.LayerPlan.from_dict(section),
        {"ratio": "1/4", "window": WINDOW, "mixer": "gated_deltanet"},
        str(out),
    )


def test_explicit_linear_fields_and_layer_types_are_honoured(batch, tmp_path):
    """A LongSFT-style config that states its linear fields and layer types gets exactly those."""
    layer_types = ["sliding_attention", "linear_attention", "linear_attention", "full_attention"] * 2
    linear = {"num_heads": 2, "head_k_dim": 8, "expand_v": 1.5, "conv_size": 3, "norm_eps": 1e-6}
    mixers = {"sliding_attention": "sliding_window", "linear_attention": "gated_deltanet"}
    plan = plan_layers(
        LAYERS,
        layers=[mixers.get(kind, "full_attention") for kind in layer_types],
        window=WINDOW,
        options={"gated_deltanet": linear},
    )
    hybrid, config = hand_built_hybrid(plan)
    fields = dict(
        layer_types=layer_types,
        num_linear_heads=2,
        num_linear_key_value_heads=2,
        linear_head_dim=8,
        expand_v=1.5,
        conv_size=3,
        conv_bias=False,
        norm_eps=1e-6,
        use_gate=True,
        mode="chunk",
    )
    write_their_checkpoint(hybrid, tmp_path, their_config(config, **fields))
    model = load_infinitevl(tmp_path)
    assert model.config.hybridize["layers"] == plan.layers
    assert {key: model.config.hybridize["mixers"]["gated_deltanet"][key] for key in linear} == linear
    torch.testing.assert_close(logits(model, batch), logits(hybrid, batch))


def rewrite_shard(folder, change) -> None:
    """Apply `change(tensors)` to the shard that holds the first linear layer, and index what it then holds."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.layers.1.self_attn.v_proj.weight"]
    tensors = load_file(folder / file)
    change(tensors)
    save_file(tensors, folder / file)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file} | dict.fromkeys(
        tensors, file
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_config(folder, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


MALFORMED = {
    "missing shard": (lambda f: (f / SHARDS[1]).unlink(), SHARDS[1]),
    "no weights": (
        lambda f: [(f / name).unlink() for name in (*SHARDS, "model.safetensors.index.json")],
        "model.safetensors",
    ),
    "another model type": (lambda f: edit_config(f, model_type="qwen2_5_vl"), "'qwen2_5_vl'"),
    "wrong shape": (
        lambda f: rewrite_shard(
            f, lambda t: t.update({"model.layers.1.self_attn.v_proj.weight": torch.zeros(8, 64)})
        ),
        r"model\.layers\.1\.self_attn\.v_proj\.weight .*\[8, 64\].*\[128, 64\]",
    ),
    "unexpected tensor": (
        lambda f: rewrite_shard(
            f, lambda t: t.update({"model.layers.1.self_attn.q_conv1d.bias": torch.zeros(64)})
        ),
        r"model\.layers\.1\.self_attn\.q_conv1d\.bias",
    ),
    "missing tensor": (
        lambda f: rewrite_shard(f, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight")),
        r"lacks model\.language_model\.layers\.1\.self_attn\.v_proj\.weight",
    ),
    "no output gate": (lambda f: edit_config(f, use_gate=False), "use_gate"),
    "grouped linear heads": (
        lambda f: edit_config(f, num_linear_key_value_heads=2),
        "num_linear_key_value_heads",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoints_are_refused_by_name(released, tmp_path, case):
    folder = tmp_path / "broken"
    shutil.copytree(released[0], folder)
    damage, message = MALFORMED[case]
    damage(folder)
    with pytest.raises(ValueError, match=message):
        load_infinitevl(folder)


def test_the_cli_runs_their_folder_as_it_is_and_imports_it(released, imported, batch, tmp_path, capsys):
    pytest.importorskip("av")  # the stream's video (the `video` extra)
    from hybridize.cli import main
    from tests.inference.test_streaming import write_video

    folder, _ = released
    assert torch.equal(logits(hybridize.load(folder, dtype="fp32"), batch), logits(imported, batch))
    image, video = tmp_path / "x.png", tmp_path / "clip.mp4"
    make_image(2).save(image)
    write_video(video, seconds=1.0)
    assert (
        main(
            [
                "generate",
                str(folder),
                "--prompt",
                "What is this?",
                "--image",
                str(image),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "stream",
                str(video),
                str(folder),
                "--ask",
                "What?",
                "--frame-size",
                "56",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert "streamed 2 frames" in capsys.readouterr().err
    assert main(["import", str(folder), "--out", str(tmp_path / "ours"), "--dtype", "fp32"]) == 0
    assert torch.equal(logits(hybridize.load(tmp_path / "ours"), batch), logits(imported, batch))

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / SHARDS[1]).unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(broken), "--prompt", "Hi"])
    assert exit_info.value.code == 2 and f"lacks the shard {SHARDS[1]}" in capsys.readouterr().err
