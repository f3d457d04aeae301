"""Pure functions for the mixers' math: a PyTorch reference beside every kernel path."""

from hybridize.mixers.ops.backends import fla_available, library_available, resolve_backend
from hybridize.mixers.ops.gated_delta_rule import (
    chunk_gated_delta_rule_torch,
    gated_delta_rule,
    gated_delta_rule_gates,
    l2norm,
    recurrent_gated_delta_rule_torch,
)
from hybridize.mixers.ops.gla import chunk_gla_torch, gla, recurrent_gla_torch
from hybridize.mixers.ops.ssd import ssd, ssd_chunk_torch, ssd_recurrent_torch

__all__ = [
    "chunk_gated_delta_rule_torch",
    "chunk_gla_torch",
    "fla_available",
    "gated_delta_rule",
    "gated_delta_rule_gates",
    "gla",
    "l2norm",
    "library_available",
    "recurrent_gated_delta_rule_torch",
    "recurrent_gla_torch",
    "resolve_backend",
    "ssd",
    "ssd_chunk_torch",
    "ssd_recurrent_torch",
]
