"""How the next token is chosen, one rule for every decoding loop of ours: generate()'s.

fp32 logits go through transformers' `LogitsProcessorList` (the one generate() builds from the generation
config: its processors, and its warpers when sampling), then the argmax, or one multinomial draw from the softmax
when sampling. `static_generate` gets the list from generate(); a streamed answer builds the same list
(`hybridize.compat.generation_logits_processors`), so both pick what generate() picks and draw the same random
numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def choose_next_tokens(
    logits_processor, sequences: torch.Tensor, logits: torch.Tensor, do_sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) next tokens after `sequences` (B, T) token ids so far, from their (B, vocab) next-token logits; and
    the processed fp32 scores (the stopping criteria read them)."""
    scores = logits_processor(sequences, logits.to(dtype=torch.float32, copy=True))
    if do_sample:
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1), scores
    return torch.argmax(scores, dim=-1), scores
