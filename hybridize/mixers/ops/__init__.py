"""Pure functions for the mixers' math: a PyTorch reference beside every kernel path."""

from hybridize.mixers.ops.backends import available_backends, fla_available, resolve_backend
from hybridize.mixers.ops.gated_delta_rule import (
    chunk_gated_delta_rule_torch,
    gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule_torch,
)
from hybridize.mixers.ops.gla import chunk_gla_torch, gla, recurrent_gla_torch
from hybridize.mixers.ops.ssd import ssd, ssd_chunk_torch, ssd_recurrent_torch

__all__ = [
    "available_backends",
    "chunk_gla_torch",
    "gla",
    "recurrent_gla_torch",
    "ssd",
    "ssd_chunk_torch",
    "ssd_recurrent_torch",
    "chunk_gated_delta_rule_torch",
    "fla_available",
    "gated_delta_rule",
    "l2norm",
    "recurrent_gated_delta_rule_torch",
    "resolve_backend",
]
