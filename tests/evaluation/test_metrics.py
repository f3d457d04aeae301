"""The metric functions against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hybridize.evaluation import metrics


def test_positions_fall_in_buckets_relative_to_the_window():
    assert metrics.position_buckets(20, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 8 + [3] * 4
    assert metrics.position_buckets(5, None).tolist() == [0] * 5
    assert metrics.bucket_names(4) == ("inside", "1-2x", "2-4x", "4x+")


def test_bucket_sums_count_only_masked_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    sums, counts = metrics.bucket_sums(values, mask, torch.tensor([0, 0, 1, 1]), 3)
    assert sums.tolist() == [23.0, 74.0, 0.0] and counts.tolist() == [3, 3, 0]


def test_answer_and_text_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert metrics.answer_positions(labels).tolist() == [[False, True, True, False, False]]
    ids = torch.tensor([[1, 9, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # the image placeholder (9), the padding and the last real token (it predicts nothing) are out
    assert metrics.text_positions(ids, mask, (9,)).tolist() == [[True, False, True, False, False]]


def test_token_fidelity_by_hand():
    teacher = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    hybrid = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.1, 0.7]]]))
    labels = torch.tensor([[-100, 2]])
    out = metrics.token_fidelity(teacher, hybrid, labels, chunk_tokens=1)
    kl0 = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    kl1 = 0.1 * math.log(0.5) + 0.2 * math.log(2)
    torch.testing.assert_close(out["kl"], torch.tensor([[kl0, kl1]]))
    assert out["agreement"].tolist() == [[0.0, 1.0]]
    torch.testing.assert_close(out["teacher_nll"][0, 0], torch.tensor(-math.log(0.25)))
    torch.testing.assert_close(out["hybrid_nll"][0, 0], torch.tensor(-math.log(0.25)))
    assert out["teacher_nll"][0, 1] == 0  # nothing after the last position


def test_output_errors_by_hand():
    target = torch.tensor([[[3.0, 4.0]]])
    output = torch.tensor([[[3.0, 0.0]]])
    errors = metrics.output_errors(output, target)
    assert errors["squared_error"].item() == 16.0 and errors["target_energy"].item() == 25.0
    torch.testing.assert_close(errors["cosine"], torch.tensor([[0.6]]))


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [("Red.", ["red"], 1.0), (" the  RED ", ["the red"], 1.0), ("dark red", ["red"], 0.0)],
)
def test_exact_match(prediction, references, expected):
    assert metrics.exact_match(prediction, references) == expected


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("104", ["100"], 1.0),  # 4% off
        ("106", ["100"], 0.0),  # 6% off
        ("46%", ["0.45"], 1.0),  # 0.46 vs 0.45
        ("0", ["0"], 1.0),
        ("0.01", ["0"], 0.0),
        ("Yes", ["yes"], 1.0),
        ("1,000", ["1000"], 1.0),
    ],
)
def test_relaxed_accuracy(prediction, references, expected):
    assert metrics.relaxed_accuracy(prediction, references) == expected


def test_anls_by_hand():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.anls("invoce", ["invoice"]) == pytest.approx(1 - 1 / 7)
    assert metrics.anls("abc", ["xyz", "ABC"]) == 1.0
    assert metrics.anls("abcd", ["wxyd"]) == 0.0  # distance 3/4 >= 0.5


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [("B", "B"), ("(C)", "C"), ("Answer: A.", "A"), ("top right", "B"), ("A or B", None), ("no idea", None)],
)
def test_choice_letters_are_extracted(prediction, expected):
    choices = {"A": "top left", "B": "top right", "C": "bottom left"}
    assert metrics.extract_choice(prediction, choices) == expected
    assert metrics.multiple_choice(prediction, ["b"], choices) == float(expected == "B")
