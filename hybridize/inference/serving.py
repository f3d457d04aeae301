"""A serving loop over one `StaticDecoder`: requests take its rows as rows free up, and each sequence comes out
as soon as it ends, while the decode step (a CUDA graph on GPU) stays captured.

Every row decodes at every step. A row whose sequence ended (an end-of-sequence token, or its request's own
max_new_tokens) is released and the next waiting request is admitted into it before the next step
(`StaticDecoder.admit`: its prompt is prefilled alone). Greedy by default, so each request gets the tokens of
`model.generate()` run on it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridize.inference.decode import StaticDecoder


@dataclass
class Request:
    """One prompt: input_ids (1, T), at most max_new_tokens new tokens, and the other model inputs of its
    prefill (pixel_values, image_grid_thw, ...)."""

    input_ids: torch.Tensor
    max_new_tokens: int
    inputs: dict[str, Any] = field(default_factory=dict)


def greedy(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(-1)


@torch.no_grad()
def serve(
    decoder: StaticDecoder,
    requests: Iterable[Request],
    *,
    eos_token_id: int | Sequence[int] | None = None,
    next_token: Callable[[torch.Tensor], torch.Tensor] = greedy,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode `requests` in the rows of `decoder` (its cache is reset first), admitting each into a free row.

    Yields (the request's index in `requests`, its new tokens (n,) on the host, an end-of-sequence token
    included) as each one ends, in the order they end. next_token: fp32 scores (rows, vocab) -> token ids
    (rows,), argmax by default.
    """
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    waiting = iter(enumerate(requests))
    cache = decoder.cache
    cache.reset()  # every row free
    running: dict[int, tuple[int, list[int], int]] = {}  # row -> (request index, new tokens, max_new_tokens)
    last = [0] * cache.batch_size  # each row's newest token, fed to the next step (free rows: anything)

    def take(row: int, token: int) -> bool:
        """Append `token` to the row's sequence; True (and the row released) when that ended it."""
        _, new, max_new = running[row]
        new.append(token)
        last[row] = token
        if token in eos or len(new) == max_new:
            decoder.release(row)
            return True
        return False

    def finish(row: int) -> tuple[int, torch.Tensor]:
        index, new, _ = running.pop(row)
        return index, torch.tensor(new, dtype=torch.long)

    while True:
        for row in cache.free_rows:
            while (item := next(waiting, None)) is not None:
                index, request = item
                length = request.input_ids.shape[-1]
                if request.max_new_tokens < 1:
                    raise ValueError(
                        f"Request {index} asks for max_new_tokens={request.max_new_tokens}; ask for at least 1."
                    )
                cache.check_room(length + request.max_new_tokens - 1, held=0)
                logits = decoder.admit(row, request.input_ids, **request.inputs)  # (1, vocab)
                running[row] = (index, [], request.max_new_tokens)
                if not take(row, int(next_token(logits.float())[0])):
                    break
                yield finish(row)
        if not running:
            return
        logits = decoder.step(torch.tensor(last, device=cache.device))  # (B, vocab)
        chosen = next_token(logits.float()).tolist()
        for row in list(running):
            if take(row, chosen[row]):
                yield finish(row)
