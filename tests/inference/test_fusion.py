"""Fused sibling projections compute what the separate layers compute, share their storage, and step aside whenever
they could be wrong (autograd on, parameters given new storage)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hybridize.converters import convert, plan_layers
from hybridize.inference.fusion import FusedLinear, fuse_projections, restore_model, unfuse_projections
from hybridize.mixers.gated_deltanet import GatedDeltaNetMixer
from hybridize.presets import tiny_model
from tests.conftest import needs_cuda, relative_rms


@pytest.fixture(scope="module")
def llama_hybrid():
    """A tiny Llama with Gated DeltaNet, GLA and sliding-window layers, fp64."""
    model = tiny_model("llama", num_hidden_layers=3)
    plan = plan_layers(3, "1/3", window=8, mixer="gated_deltanet,gla")
    return convert(model, plan, progress=False)[0].double().eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fused_model_computes_the_same(llama_hybrid):
    model = copy.deepcopy(llama_hybrid)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    names = list(model.state_dict())
    counts = fuse_projections(model)
    assert counts == {"mixers": 2, "mlps": 3, "patch_convs": 0}
    assert relative_rms(expected, logits(model, ids)) < 1e-12
    assert list(model.state_dict()) == names  # checkpoint names unchanged
    assert fuse_projections(model) == {"mixers": 0, "mlps": 0, "patch_convs": 0}  # idempotent


def test_fused_projection_is_one_product_over_shared_storage(llama_hybrid):
    model = copy.deepcopy(llama_hybrid)
    fuse_projections(model)
    mixer = next(m for m in model.modules() if isinstance(m, GatedDeltaNetMixer))
    fused = mixer.fused_input_projection
    assert fused.weight.shape[0] == sum(mixer.get_submodule(n).out_features for n in mixer.input_projections)
    calls = []
    for name in mixer.input_projections:
        mixer.get_submodule(name).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        # in-place updates (optimiser steps, load_state_dict) reach the fused weight
        mixer.k_proj.weight.mul_(2.0)
        hidden = torch.randn(1, 3, mixer.spec.hidden_size, dtype=torch.float64)
        outputs = mixer.project_inputs(hidden)
        assert not calls  # one fused product, no separate layer ran
        assert torch.allclose(outputs[1], mixer.k_proj(hidden))
    with torch.enable_grad():  # autograd on: the separate layers, so gradients reach the parameters
        calls.clear()
        mixer.project_inputs(hidden)[0].sum().backward()
        assert len(calls) == len(mixer.input_projections)
        assert mixer.q_proj.weight.grad is not None


def test_new_storage_falls_back_and_fuses_again(llama_hybrid):
    model = copy.deepcopy(llama_hybrid)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    fuse_projections(model)
    model.float()  # the parameters get storage of their own; the fused tensors are stale fp64
    mixer = next(m for m in model.modules() if isinstance(m, GatedDeltaNetMixer))
    assert not mixer.fused_input_projection.current()
    expected = logits(model, ids)  # runs (the layers apart) instead of mixing dtypes or stale weights
    assert fuse_projections(model) == {"mixers": 2, "mlps": 3, "patch_convs": 0}
    assert mixer.fused_input_projection.weight.dtype == torch.float32
    assert relative_rms(expected, logits(model, ids)) < 1e-6


def test_unfusing_gives_the_model_back(llama_hybrid):
    """unfuse_projections: every parameter its own storage again (an update of one no longer shows in its
    siblings' fused tensor), no hook left, the classes' forwards, the same logits; restore_model also un-compiles."""
    model = copy.deepcopy(llama_hybrid)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = logits(model, ids)
    parameters = dict(model.named_parameters())
    fuse_projections(model)
    mixer = next(m for m in model.modules() if isinstance(m, GatedDeltaNetMixer))
    fused = mixer.fused_input_projection
    mlp = next(m for m in model.modules() if hasattr(m, "fused_gate_up"))
    assert unfuse_projections(model) == {"mixers": 2, "mlps": 3, "patch_convs": 0}
    assert mixer.fused_input_projection is None and "forward" not in vars(mlp)
    assert not hasattr(mlp, "fused_gate_up")
    assert all(p is parameters[name] for name, p in model.named_parameters())  # the same Parameter objects
    with torch.no_grad():
        mixer.q_proj.weight.add_(1.0)
    assert not torch.equal(fused.weight[: mixer.q_proj.out_features], mixer.q_proj.weight)
    with torch.no_grad():
        mixer.q_proj.weight.sub_(1.0)
    assert torch.equal(logits(model, ids), expected)
    assert unfuse_projections(model) == {"mixers": 0, "mlps": 0, "patch_convs": 0}  # idempotent
    mlp.compile()  # as a streaming session compiles vision blocks in place (compiled lazily: nothing runs here)
    fuse_projections(model)
    assert restore_model(model) == {"mixers": 2, "mlps": 3, "patch_convs": 0, "compiled": 1}
    assert mlp._compiled_call_impl is None


def test_round_trip_after_fusing(llama_hybrid, tmp_path):
    model = copy.deepcopy(llama_hybrid)
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    fuse_projections(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    expected = llama_hybrid.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(p, expected[name]) for name, p in loaded.state_dict().items())
    # Equal weights, equal outputs up to rounding: the loaded weights are mapped from the file at offsets that
    # are not 64-byte aligned, and CPU products over them take other kernels (last-bit differences; aligned
    # copies of the same weights give identical logits).
    assert relative_rms(logits(llama_hybrid, ids), logits(loaded, ids)) < 1e-13


def test_mlp_of_another_formula_is_left_alone():
    class SwappedMLP(nn.Module):  # down(act(up) * gate): the same parts, another formula
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
            self.down_proj, self.act_fn = nn.Linear(16, 8, bias=False), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    mlp = SwappedMLP()
    x = torch.randn(3, 8)
    expected = mlp(x)
    assert fuse_projections(mlp) == {"mixers": 0, "mlps": 0, "patch_convs": 0}
    assert torch.equal(mlp(x), expected)


def test_fused_linear_checks_its_layers():
    with pytest.raises(ValueError, match="one input size"):
        FusedLinear([nn.Linear(4, 2), nn.Linear(5, 2)])
    with pytest.raises(ValueError, match="biases on all or none"):
        FusedLinear([nn.Linear(4, 2), nn.Linear(4, 2, bias=False)])
    with pytest.raises(TypeError, match="plain nn.Linear"):
        FusedLinear([nn.Conv1d(4, 2, 1)])


def biased_mlp(dtype: torch.dtype, device: str = "cpu", intermediate: int | None = None) -> nn.Module:
    """Qwen2.5-VL-3B's ViT MLP, biased (its 3420-row gate and up projections fuse to 6840 rows), or with another
    intermediate size."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    from hybridize.presets import qwen2_5_vl_3b_config

    config = qwen2_5_vl_3b_config().vision_config
    config.intermediate_size = intermediate or config.intermediate_size
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2_5_VLMLP(config, bias=True).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_biased_fused_rows_are_padded_to_128_bytes(dtype):
    """Biased fused products get zero rows up to 128 bytes per output row, so a compiled product's output rows need
    no padding (which would cost a broadcast copy of the bias on CUDA); the layers' outputs are unchanged and their
    parameters stay views of the fused tensor. Without biases, nothing is padded."""
    mlp = biased_mlp(dtype, intermediate=27)
    x = torch.randn(3, mlp.gate_proj.in_features, dtype=dtype)
    with torch.no_grad():
        expected = [mlp.gate_proj(x), mlp.up_proj(x)]
        fused = FusedLinear([mlp.gate_proj, mlp.up_proj])
        rows = fused.weight.shape[0]
        assert (
            rows * fused.weight.element_size() % 128 == 0
            and 54 < rows < 54 + 128 // fused.weight.element_size()
        )
        assert fused.bias.shape == (rows,) and not fused.weight[54:].any() and not fused.bias[54:].any()
        assert mlp.up_proj.weight.data_ptr() == fused.weight[27].data_ptr()
        assert mlp.up_proj.bias.data_ptr() == fused.bias[27:].data_ptr()
        tolerance = 1e-12 if dtype == torch.float64 else 1e-2
        assert all(relative_rms(a, b) < tolerance for a, b in zip(expected, fused(x), strict=True))
        unbiased = FusedLinear(
            [nn.Linear(4, 3, bias=False, dtype=dtype), nn.Linear(4, 5, bias=False, dtype=dtype)]
        )
        assert unbiased.weight.shape[0] == 8 and [part.shape[-1] for part in unbiased(x[:, :4])] == [3, 5]


@needs_cuda()
def test_compiled_biased_mlp_copies_nothing():
    """Compiled on CUDA, the ViT's fused MLP on a 448x448 frame's 1,024 rows runs without a copy kernel: its gate
    and up product writes a contiguous output (6,848 columns) with the bias in cuBLASLt's epilogue. Unpadded, its
    6,840-column rows were padded by inductor to 6,848, and aten copied the broadcast bias into them and ran a
    beta=1 product: 0.40 ms of a frame's ViT on an H100."""
    mlp = biased_mlp(torch.bfloat16, "cuda")
    x = torch.randn(1024, mlp.gate_proj.in_features, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        expected = mlp(x)
        assert fuse_projections(mlp)["mlps"] == 1
        compiled = torch.compile(mlp, dynamic=False)
        compiled(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            got = compiled(x)
            torch.cuda.synchronize()
    kernels = [
        event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA
    ]
    copies = [name for name in kernels if "direct_copy" in name or "Memcpy" in name]  # aten's copies
    assert kernels and not copies, kernels
    assert relative_rms(expected, got) < 1e-2


def test_misaligned_down_projection_runs_padded():
    """A down projection of 13 inputs (Qwen2.5-VL's ViT: 3420) runs over operands zero-padded to 16 columns; the
    layer's weight is a view of the padded weight and the MLP computes the same."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from hybridize.presets import TINY_CONFIGS

    config = TINY_CONFIGS["llama"](num_hidden_layers=1)
    config.intermediate_size = 13
    mlp = LlamaMLP(config).double().eval()
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    expected = mlp(x)
    assert fuse_projections(mlp) == {"mixers": 0, "mlps": 1, "patch_convs": 0}
    aligned = mlp.aligned_down_proj
    assert aligned.weight.shape[1] == 16 and mlp.down_proj.weight.data_ptr() == aligned.weight.data_ptr()
    with torch.no_grad():
        assert relative_rms(expected, mlp(x)) < 1e-12


def test_patch_embedding_runs_as_one_product(tiny_teacher):
    """Qwen2.5-VL's patch embedding (a Conv3d called on one 2x14x14 patch per row) runs as a matrix product over
    the flattened patches: the same embeddings, no convolution; the convolution again with autograd on, for inputs
    larger than one patch, and after unfusing."""
    model = copy.deepcopy(tiny_teacher[0]).double()
    embed = model.model.visual.patch_embed
    conv = embed.proj
    pixels = torch.randn(12, conv.in_channels * conv.weight[0, 0].numel(), dtype=torch.float64)
    with torch.no_grad():
        expected = embed(pixels)
    assert fuse_projections(model)["patch_convs"] == 1
    assert fuse_projections(model)["patch_convs"] == 0  # idempotent
    real = conv._conv_forward
    conv._conv_forward = lambda *args: pytest.fail("ran the convolution")
    with torch.no_grad():
        assert relative_rms(expected, embed(pixels)) < 1e-13
    conv._conv_forward = real
    assert embed(pixels).requires_grad  # autograd on: the convolution, gradients reach its weight
    larger = torch.randn(1, conv.in_channels, *(2 * size for size in conv.kernel_size), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(conv(larger), conv._conv_forward(larger, conv.weight, conv.bias))
    assert unfuse_projections(model)["patch_convs"] == 1 and "forward" not in vars(conv)
    for other in (
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(3, 4, 3, dilation=2),
    ):
        assert fuse_projections(other)["patch_convs"] == 0  # not a product over the flattened patch
