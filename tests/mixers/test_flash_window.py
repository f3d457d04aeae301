"""The flash-window attention implementation: the same model as SDPA under transformers' dense masks (CPU, fp64,
its reference path) and, on CUDA, PyTorch's flash kernel against that reference (bf16)."""

from __future__ import annotations

import itertools

import pytest
import torch

from hybridize.compat import configured_attention
from hybridize.converters import convert, plan_layers
from hybridize.converters.discovery import use_attention_implementation
from hybridize.mixers.flash_window import FLASH_WINDOW, _masked_reference, flash_window_attention
from hybridize.mixers.ops.flash import flash_kernel_usable
from hybridize.presets import tiny_model
from tests.conftest import needs_cuda, relative_rms

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

# Window 5 on 14-token rows: the window mask matters. llama has no native window (the mixer form); qwen2 does.
LAYERS = "0:sliding_window,1:gated_deltanet,2:full_attention,3:sliding_window"


def hybrid_of(model_type: str):
    torch.manual_seed(0)
    teacher = tiny_model(model_type, num_hidden_layers=4).double()
    plan = plan_layers(4, layers=LAYERS, window=5)
    plan.mixers["gated_deltanet"]["backend"] = "torch"
    return convert(teacher, plan, progress=False)[0].train()


def logits_and_grads(model, implementation: str, **inputs):
    use_attention_implementation(model, implementation)
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits
    mask = inputs.get("attention_mask")
    real = logits if mask is None else logits * mask[..., None]
    (real.square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return real.detach(), grads


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_padded_batch_gives_sdpas_logits_and_gradients(model_type):
    model = hybrid_of(model_type)
    ids = torch.randint(3, 250, (3, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    expected, expected_grads = logits_and_grads(model, "sdpa", input_ids=ids, attention_mask=mask)
    logits, grads = logits_and_grads(model, FLASH_WINDOW, input_ids=ids, attention_mask=mask)
    assert configured_attention(model.model.layers[2].self_attn.config) == FLASH_WINDOW
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert expected_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_rows_give_sdpas_block_diagonal_logits(model_type):
    """Three samples in two rows (positions restart at each): transformers builds a block-diagonal window mask
    from the positions under SDPA; the flash-window implementation reads the boundaries instead."""
    model = hybrid_of(model_type)
    ids = torch.randint(3, 250, (2, 14), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([list(range(9)) + list(range(5)), list(range(14))])
    packing = {
        "cu_seq_lens_q": torch.tensor([0, 9, 14, 28], dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor([0, 9, 14, 28], dtype=torch.int32),
        "max_length_q": 14,
        "max_length_k": 14,
    }
    expected, expected_grads = logits_and_grads(
        model, "sdpa", input_ids=ids, position_ids=positions, **packing
    )
    logits, grads = logits_and_grads(model, FLASH_WINDOW, input_ids=ids, position_ids=positions, **packing)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-8, atol=1e-10, msg=name)


def test_a_dense_mask_or_a_logit_softcap_is_refused_with_the_fix():
    module = torch.nn.Module()
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="2-D key-padding mask.*use_attention_implementation"):
        flash_window_attention(module, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="passes softcap.*flash_window: false"):
        flash_window_attention(module, q, q, q, None, softcap=50.0)


CUDA_CASES = {
    # name: (batch, length, window, padding of each row (left, right), packed boundaries)
    "window": (2, 700, 256, None, None),
    "full": (2, 700, None, None, None),
    "padded window": (3, 600, 128, [(0, 0), (37, 0), (0, 211)], None),
    "packed window, a sample across rows": (2, 640, 128, None, [0, 100, 101, 900, 1280]),
    "packed full": (1, 1024, None, None, [0, 300, 1000, 1024]),
}


@needs_cuda("needs CUDA")
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda_flash_kernel_matches_the_masked_reference_bf16(case):
    """Outputs and q/k/v gradients of the flash kernel (bf16) against the reference SDPA in fp32 on the same bf16
    inputs, GQA 16/2 heads of 128 as in Qwen2.5-VL-3B; within the bf16 tolerances of DESIGN.md."""
    batch, length, window, padding, bounds = CUDA_CASES[case]
    assert flash_kernel_usable(torch.device("cuda"), torch.bfloat16, 128)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
        for heads in (16, 2, 2)
    )
    upstream = torch.randn(batch, length, 16, 128, device="cuda", generator=generator)
    mask = None
    if padding is not None:
        mask = torch.ones(batch, length, dtype=torch.bool, device="cuda")
        for row, (left, right) in enumerate(padding):
            mask[row, :left] = False
            mask[row, length - right :] = False
    packing = {}
    if bounds is not None:
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        longest = max(end - start for start, end in itertools.pairwise(bounds))  # the kernel grid covers it
        packing = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    module = torch.nn.Module().eval()

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        (out.float() * upstream).sum().backward()
        return out.float(), [leaf.grad.float() for leaf in leaves]

    out, grads = run(
        lambda a, b, c: flash_window_attention(module, a, b, c, mask, sliding_window=window, **packing)[0],
        torch.bfloat16,
    )
    cu = packing.get("cu_seq_lens_q")
    expected, expected_grads = run(
        lambda a, b, c: _masked_reference(a, b, c, mask, 128**-0.5, True, window, cu, cu, 0.0), torch.float32
    )
    assert relative_rms(expected, out) < 1e-2
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        assert relative_rms(expected_grad, grad) < 2e-2, name


@needs_cuda("needs CUDA")
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_flash_kernel_after_cached_keys_matches_the_masked_reference_bf16(padded):
    """A prefill chunk after cached keys (static decoding's prefill): 300 queries over 700 keys, the queries the
    last keys, window 256, rows left-padded or not; forward in bf16 against the fp32 reference."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 16, 300, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = (
        torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in "kv"
    )
    mask = torch.ones(2, 700, dtype=torch.bool, device="cuda")
    if padded:
        mask[1, :90] = False
    module = torch.nn.Module().eval()
    out = flash_window_attention(module, q, k, v, mask, sliding_window=256)[0].float()
    expected = _masked_reference(q.float(), k.float(), v.float(), mask, 128**-0.5, True, 256, None, None, 0.0)
    assert relative_rms(expected, out) < 1e-2
