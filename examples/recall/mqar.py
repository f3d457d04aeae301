"""Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology"): the synthetic recall task of the
linear-attention literature.

A sequence opens with `num_pairs` key-value pairs (`k1 v1 k2 v2 ...`, distinct keys), then filler tokens in
which `num_queries` keys are asked again at random positions; the target at a query is the value that followed
that key. Labels follow transformers' convention: the value is the label of the position after the query
(whose input is filler), so the logits at the query predict it. The answer is never written into the sequence, so every query must be answered from the
opening pairs: the distance between a key and its query is exactly what the model has to remember across,
and a query cannot be solved by elimination from earlier answers.

Token ids: 0 filler (also padding), 1..num_keys keys, then num_values values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

FILLER = 0
IGNORE = -100


@dataclass(frozen=True)
class MQARTask:
    num_pairs: int = 16
    num_queries: int = 32
    num_keys: int = 64
    num_values: int = 64
    seq_len: int = 320

    def __post_init__(self):
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"num_pairs={self.num_pairs} needs at least as many keys (num_keys={self.num_keys})."
            )
        if self.num_queries > self.free_positions:
            raise ValueError(
                f"seq_len={self.seq_len} leaves {self.free_positions} query positions after the "
                f"{self.num_pairs} pairs, fewer than num_queries={self.num_queries}; lengthen the sequence."
            )

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values

    @property
    def free_positions(self) -> int:
        """Positions a query can take: after the pairs, before the last token (which holds its label)."""
        return self.seq_len - 1 - 2 * self.num_pairs

    @property
    def max_distance(self) -> int:
        return self.seq_len - 2

    def to_dict(self) -> dict:
        return asdict(self)

    def sample(self, batch_size: int, generator: torch.Generator, span: int | None = None) -> dict:
        """A batch: input_ids, attention_mask, labels (the value one position after each query, IGNORE
        elsewhere) and distance (query position - key position at each query, 0 elsewhere). `span` limits the queries to the first
        `span` positions after the pairs (a curriculum from short to long distances); the sequence length
        stays `seq_len`."""
        pairs, queries = self.num_pairs, self.num_queries
        free = self.free_positions
        span = free if span is None else max(queries, min(span, free))
        keys = torch.rand(batch_size, self.num_keys, generator=generator).argsort(-1)[:, :pairs] + 1
        values = torch.randint(self.num_values, (batch_size, pairs), generator=generator) + 1 + self.num_keys
        input_ids = torch.full((batch_size, self.seq_len), FILLER)
        input_ids[:, 0 : 2 * pairs : 2], input_ids[:, 1 : 2 * pairs : 2] = keys, values
        # (B, queries): distinct positions after the pairs, each asking one of the pairs (with repeats)
        positions = 2 * pairs + torch.rand(batch_size, span, generator=generator).argsort(-1)[:, :queries]
        asked = torch.randint(pairs, (batch_size, queries), generator=generator)
        input_ids.scatter_(1, positions, keys.gather(1, asked))
        labels = torch.full_like(input_ids, IGNORE).scatter_(1, positions + 1, values.gather(1, asked))
        distance = torch.zeros_like(input_ids).scatter_(1, positions, positions - 2 * asked)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "distance": distance,
        }


class MQARBatches(Dataset):
    """`num_batches` batches of `task`, batch i drawn from seed (seed, i): the same data whatever the order
    or the resumption point. With `curriculum`, the query span grows linearly from `min_span` to the whole
    sequence over the first `curriculum` fraction of the batches. Use with DataLoader(batch_size=None)."""

    def __init__(
        self,
        task: MQARTask,
        num_batches: int,
        batch_size: int,
        seed: int,
        curriculum: float = 0.0,
        min_span: int = 32,
    ):
        self.task, self.num_batches, self.batch_size, self.seed = task, num_batches, batch_size, seed
        self.curriculum, self.min_span = curriculum, min_span

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        span = None
        if self.curriculum:
            free = self.task.free_positions
            progress = min(1.0, index / (self.curriculum * self.num_batches))
            span = int(self.min_span + (free - self.min_span) * progress)
        batch = self.task.sample(self.batch_size, generator, span)
        del batch["distance"]  # models take only their inputs and labels
        return batch


@torch.no_grad()
def recall_by_distance(model, task: MQARTask, num_sequences: int, batch_size: int, seed: int) -> dict:
    """Greedy recall of every query in `num_sequences` fresh sequences: {"distance": (N,), "correct": (N,)}
    as CPU tensors, one entry per query."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    distances, correct = [], []
    for start in range(0, num_sequences, batch_size):
        batch = task.sample(min(batch_size, num_sequences - start), generator)
        queries = batch["labels"][:, 1:] != IGNORE  # (B, T - 1): the logits at t predict the label at t + 1
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        predicted = logits[:, :-1].argmax(-1).cpu()
        distances.append(batch["distance"][:, :-1][queries])
        correct.append((predicted == batch["labels"][:, 1:])[queries])
    return {"distance": torch.cat(distances), "correct": torch.cat(correct)}


def accuracy_in_bins(recall: dict, edges: list[int]) -> list[float | None]:
    """Recall in each distance bin (edges[i], edges[i + 1]]; None for a bin with no query."""
    out = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (recall["distance"] > low) & (recall["distance"] <= high)
        out.append(recall["correct"][inside].float().mean().item() if inside.any() else None)
    return out
