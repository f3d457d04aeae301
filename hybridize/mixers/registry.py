"""Registry of token mixers, keyed by name (as PEFT keys its tuners)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from hybridize.mixers.base import AttentionSpec, MixerConfig, TokenMixer

_MIXERS: dict[str, type[TokenMixer]] = {}


def register_mixer(name: str, *, overwrite: bool = False) -> Callable[[type[TokenMixer]], type[TokenMixer]]:
    """Class decorator: make a `TokenMixer` subclass available under `name` to plans, the CLI and configs."""

    def decorate(cls: type[TokenMixer]) -> type[TokenMixer]:
        if not (isinstance(cls, type) and issubclass(cls, TokenMixer)):
            raise TypeError(f"@register_mixer({name!r}) decorates TokenMixer subclasses, got {cls!r}.")
        if not dataclasses.is_dataclass(cls.config_class):
            raise TypeError(f"{cls.__name__}.config_class must be a dataclass (a MixerConfig subclass).")
        if name in _MIXERS and _MIXERS[name] is not cls and not overwrite:
            raise ValueError(
                f"A mixer named {name!r} is already registered ({_MIXERS[name].__name__}); "
                "pick another name or pass overwrite=True."
            )
        cls.name = name
        _MIXERS[name] = cls
        return cls

    return decorate


def available_mixers() -> list[str]:
    """Names of the registered mixers."""
    return sorted(_MIXERS)


def get_mixer_class(name: str) -> type[TokenMixer]:
    if name not in _MIXERS:
        raise ValueError(
            f"Unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}. A custom mixer must be "
            "registered (@register_mixer) before a plan or checkpoint that names it is used: import its module."
        )
    return _MIXERS[name]


def mixer_config(name: str, values: MixerConfig | dict[str, Any] | None, spec: AttentionSpec) -> MixerConfig:
    """The resolved config of mixer `name` from a dict of overrides (unknown keys are an error)."""
    config_class = get_mixer_class(name).config_class
    if isinstance(values, MixerConfig):
        return values.resolve(spec)
    values = dict(values or {})
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for mixer {name!r}; its options are {sorted(known)}.")
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        check_option_type(name, key, value, hints.get(key))
    return config_class(**values).resolve(spec)


SCALARS = (bool, int, float, str, type(None))


def check_option_type(mixer: str, key: str, value: Any, hint: Any) -> None:
    """A mixer option's value against its config field's annotation (scalars and their unions; other
    annotations are left to the config's `resolve`). An int passes for a float; a bool never for a number."""
    accepted = (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    )
    if not all(kind in SCALARS for kind in accepted):
        return
    if any(_is_a(value, kind) for kind in accepted):
        return
    names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in accepted)
    raise ValueError(f"Option {mixer}.{key}={value!r} must be {names}, not {type(value).__name__}.")


def build_mixer(
    name: str,
    config: MixerConfig | dict[str, Any] | None,
    spec: AttentionSpec,
    layer_idx: int,
    teacher_attention: Any = None,
) -> TokenMixer:
    """Build mixer `name` for layer `layer_idx`.

    With `teacher_attention`, a mixer that wraps attention takes that module as is; any other mixer is
    initialised from it by the config's init policy.
    """
    resolved = mixer_config(name, config, spec)
    cls = get_mixer_class(name)
    if cls.wraps_attention:
        if teacher_attention is None:
            raise ValueError(
                f"Mixer {name!r} wraps the layer's attention module; pass it as teacher_attention."
            )
        return cls(resolved, spec, layer_idx, attention=teacher_attention)
    mixer = cls(resolved, spec, layer_idx)
    if teacher_attention is not None:
        mixer.initialize_from_teacher(teacher_attention, getattr(resolved, "init", "mimic"))
    return mixer


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):  # bool is an int to Python, never to a mixer option
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)
