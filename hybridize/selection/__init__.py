"""Which layers keep softmax attention: data-driven placement (`hybridize select`)."""

from hybridize.selection.methods import METHODS, SelectionMethod, get_method, register_method
from hybridize.selection.select import SelectionResult, SelectionSettings, parse_budget, select_layers

__all__ = [
    "METHODS",
    "SelectionMethod",
    "SelectionResult",
    "SelectionSettings",
    "get_method",
    "parse_budget",
    "register_method",
    "select_layers",
]
