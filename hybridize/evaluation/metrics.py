"""Pure metric functions: fidelity of a hybrid to its teacher (per token, per position bucket) and task scores.

Fidelity metrics are computed per token, then summed per bucket of token positions relative to the sliding
window W: `inside` (position < W), `1-2x` (W <= position < 2W), `2-4x` and `4x+`. Beyond the window is where
a hybrid has to rely on its linear mixers alone, so that is where it fails first.

Task scores compare one generated answer with its reference answers (the best match counts):
exact match, relaxed accuracy (ChartQA: numbers within 5%), ANLS (DocVQA) and multiple choice (MMBench: the
answer letter extracted from the reply).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from hybridize.lightning_modules.data import IGNORE_INDEX
from hybridize.lightning_modules.losses import _token_kl
from hybridize.mixers.ops.dtypes import compute_dtype

# ------------------------------------------------------------------------------------------------ positions

BUCKETS = ("inside", "1-2x", "2-4x", "4x+")
BUCKET_STARTS = (0, 1, 2, 4)  # in windows
ALL_POSITIONS = "all positions"  # the single bucket of a hybrid without a window


def bucket_names(window: int | None) -> tuple[str, ...]:
    return BUCKETS if window else (ALL_POSITIONS,)


def position_buckets(length: int, window: int | None, device=None) -> torch.Tensor:
    """(length,) long: the bucket index of every position 0..length-1 (all 0 without a window)."""
    positions = torch.arange(length, device=device)
    if not window:
        return torch.zeros_like(positions)
    starts = torch.tensor(BUCKET_STARTS[1:], device=device) * window
    return torch.bucketize(positions, starts, right=True)


def bucket_sums(
    values: torch.Tensor, mask: torch.Tensor, buckets: torch.Tensor, num_buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of `values` (B, T) where `mask` (B, T) is True, per bucket of `buckets` (T,) -> (K,), (K,),
    fp64 on the CPU (sums over millions of tokens)."""
    index = buckets.expand_as(values)[mask]
    picked = values[mask].double()
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=values.device).index_add_(0, index, picked)
    counts = torch.bincount(index, minlength=num_buckets)
    return sums.cpu(), counts.cpu()


# ------------------------------------------------------------------------------------------------ tokens


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose logits predict a labelled token (labels are unshifted, as transformers
    takes them: the logits at t predict labels[t + 1])."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts


def text_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vision_token_ids: tuple[int, ...] = ()
) -> torch.Tensor:
    """(B, T) bool: real tokens (not padding) that are not image / video placeholders, minus the last position of
    each row (it predicts nothing in the sequence)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for token_id in vision_token_ids:
        valid = valid & (input_ids != token_id)
    following = torch.zeros_like(valid)
    following[:, :-1] = valid[:, 1:] if attention_mask is None else attention_mask[:, 1:].bool()
    return valid & following


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T): negative log-likelihood of labels[t + 1] under the logits at t (0 where nothing is labelled)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    nll = F.cross_entropy(
        logits.flatten(0, 1).to(compute_dtype(logits)),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view_as(labels)


def token_fidelity(
    teacher_logits: torch.Tensor, hybrid_logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 1024
) -> dict[str, torch.Tensor]:
    """Per-token comparison of two models' logits (B, T, V) -> {name: (B, T)}, in chunks of `chunk_tokens` rows
    (fp32 softmaxes of a 152K vocabulary over a long batch would not fit at once):
    kl: KL(teacher || hybrid) of the next-token distributions; agreement: 1 where both argmaxes are equal;
    teacher_nll / hybrid_nll: each model's negative log-likelihood of the labelled next token."""
    batch, length, vocab = teacher_logits.shape
    teacher, hybrid = teacher_logits.reshape(-1, vocab), hybrid_logits.reshape(-1, vocab)
    rows = []
    for start in range(0, batch * length, chunk_tokens):
        t, h = teacher[start : start + chunk_tokens], hybrid[start : start + chunk_tokens]
        rows.append((_token_kl(h, t, 1.0), (t.argmax(-1) == h.argmax(-1)).to(compute_dtype(t))))
    kl, agreement = (torch.cat(parts).view(batch, length) for parts in zip(*rows, strict=True))
    return {
        "kl": kl,
        "agreement": agreement,
        "teacher_nll": token_nll(teacher_logits, labels),
        "hybrid_nll": token_nll(hybrid_logits, labels),
    }


def output_errors(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mixer's output against the teacher attention's, both (B, T, D) -> {name: (B, T)} in fp32:
    squared_error ||o - t||^2, target_energy ||t||^2 (their ratio of sums is the relative MSE) and cosine."""
    dtype = compute_dtype(output)
    output, target = output.to(dtype), target.to(dtype)
    return {
        "squared_error": (output - target).pow(2).sum(-1),
        "target_energy": target.pow(2).sum(-1),
        "cosine": F.cosine_similarity(output, target, dim=-1, eps=1e-12),
    }


# ------------------------------------------------------------------------------------------------ task scores


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or trailing full stop."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(ref) for ref in references))


def _number(text: str) -> float | None:
    """ChartQA's reading of a number: "12.5", "1,000", "45%" (-> 0.45); None if it is not one."""
    text = text.strip().replace(",", "")
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: list[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: a number within `tolerance` relative error of a numeric reference (exactly
    equal to a zero one), otherwise an exact (case-insensitive) string match."""
    predicted = _number(prediction)
    for reference in references:
        target = _number(reference)
        if predicted is not None and target is not None:
            if (predicted == target) if target == 0 else abs(predicted - target) / abs(target) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == reference.strip().lower():
            return 1.0
    return 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b))."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """DocVQA's average normalised Levenshtein similarity for one question: the best over the references of
    1 - distance / max(length) of the lower-cased, space-normalised strings, 0 where that distance is >= 0.5."""
    predicted = " ".join(prediction.lower().split())
    best = 0.0
    for reference in references:
        target = " ".join(reference.lower().split())
        longest = max(len(predicted), len(target))
        distance = levenshtein(predicted, target) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def extract_choice(prediction: str, choices: dict[str, str]) -> str | None:
    """The option letter a reply picks, MMBench style: a letter standing alone ("B", "(B)", "B.", "Answer: B"),
    else the one option whose text the reply contains; None if neither identifies exactly one option."""
    letters = "".join(re.escape(letter) for letter in choices)
    found = set(re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", prediction.strip()))
    if len(found) == 1:
        return found.pop()
    text = normalize_answer(prediction)
    named = [letter for letter, option in choices.items() if normalize_answer(option) in text]
    return named[0] if len(named) == 1 else None


def multiple_choice(prediction: str, references: list[str], choices: dict[str, str]) -> float:
    return float(extract_choice(prediction, choices) in {ref.strip().upper() for ref in references})


def perplexity(mean_nll: float | None) -> float | None:
    return None if mean_nll is None else math.exp(mean_nll)
