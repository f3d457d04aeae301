"""Sliding-window attention: the window is respected, natively and by the fallback mixer."""

from __future__ import annotations

import pytest
import torch

from hybridize.converters import convert, plan_layers
from hybridize.mixers import SlidingWindowMixer, mixer_config
from hybridize.mixers.base import AttentionSpec
from hybridize.mixers.cache import SlidingWindowSlot
from hybridize.presets import tiny_qwen2_5_vl

pytestmark = pytest.mark.transformers_surface  # also run on the oldest supported transformers

WINDOW = 6


@pytest.fixture(scope="module")
def one_layer_teacher():
    return tiny_qwen2_5_vl(num_hidden_layers=1)[0]


def swa_model(teacher, implementation):
    plan = plan_layers(1, "1", window=WINDOW)
    plan.mixers["sliding_window"]["implementation"] = implementation
    return convert(teacher, plan, progress=False)[0]


@pytest.mark.parametrize("implementation", ["native", "mixer"])
def test_tokens_beyond_the_window_do_not_change_the_last_logits(one_layer_teacher, implementation):
    model = swa_model(one_layer_teacher, implementation)
    assert isinstance(model.model.language_model.layers[0].self_attn, SlidingWindowMixer) == (
        implementation == "mixer"
    )
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))
    last = ids.shape[1] - 1

    def last_logits(position):
        changed = ids.clone()
        changed[0, position] = (changed[0, position] + 1) % 250
        with torch.no_grad():
            return model(changed).logits[0, -1]

    with torch.no_grad():
        reference = model(ids).logits[0, -1]
    assert torch.equal(last_logits(last - WINDOW), reference)  # just outside the window
    assert torch.equal(last_logits(0), reference)
    assert not torch.allclose(last_logits(last - WINDOW + 1), reference)  # the oldest token inside it


def test_fallback_mixer_equals_native_with_padding(tiny_teacher):
    teacher, _ = tiny_teacher
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    outputs = {}
    for implementation in ("native", "mixer"):
        plan = plan_layers(8, "1/2", window=WINDOW)
        plan.mixers["sliding_window"]["implementation"] = implementation
        torch.manual_seed(0)  # the same Gated DeltaNet weights in both models
        model = convert(teacher, plan, progress=False)[0]
        with torch.no_grad():
            outputs[implementation] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(outputs["mixer"][real], outputs["native"][real], rtol=1e-5, atol=1e-5)


def test_window_must_be_positive():
    spec = AttentionSpec(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4)
    for window in (0, -1):
        with pytest.raises(ValueError, match="window"):
            mixer_config("sliding_window", {"window": window}, spec)


def test_the_window_slot_keeps_its_keys_padding_with_its_rows():
    """Beam search and batch edits reorder, repeat and select the rows of the keys: the padding of the keys the
    sliding_window mixer tracks on its slot moves with them."""
    slot = SlidingWindowSlot(sliding_window=4)
    keys = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2).clone()
    slot.update(keys, keys.clone())
    padding = torch.tensor([[True, False], [True, True], [False, True]])
    slot.record_key_padding(padding)
    assert torch.equal(slot.past_key_padding(padding), padding)
    slot.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(slot.keys[:, 0, 0, 0], torch.tensor([2.0, 0.0, 1.0]))
    assert torch.equal(slot.past_key_padding(padding), padding[[2, 0, 1]])
    slot.batch_repeat_interleave(2)
    assert torch.equal(slot.past_key_padding(padding), padding[[2, 2, 0, 0, 1, 1]])
    slot.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(slot.keys[:, 0, 0, 0], torch.tensor([2.0, 1.0]))
    assert torch.equal(slot.past_key_padding(padding), padding[[2, 1]])
    assert SlidingWindowSlot(4).past_key_padding(padding).shape == (3, 0)  # nothing cached yet
