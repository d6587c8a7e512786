"""Architecture name -> SAE class, and the options class registered with it.

Each architecture file registers itself: `@register("jumprelu", options=JumpReLUOptions)`. Everything else that
depends on the architecture (the config's keys, the CLI's flags, run-file checks, the SAELens export, the model card,
the tests' architecture lists) asks the registry, so adding an architecture is its own file and its tests.
This module imports nothing of the package (the config asks it which options an architecture has), so classes are
annotated as `type`: SAE subclasses (saelab.sae.base) and Options subclasses (saelab.sae.config).
"""
from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register(name: str, *, options: type | None = None):
    """Class decorator: make `create_sae(SAEConfig(arch=name, ...))` build this class, with `options` (a subclass of
    saelab.sae.config.Options) holding the settings only this architecture reads; None keeps the base class's."""

    def add(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.arch = name
        if options is not None:
            cls.options_cls = options
        _REGISTRY[name] = cls
        return cls

    return add


def available_architectures() -> list[str]:
    return sorted(_REGISTRY)


def sae_class(arch: str) -> type:
    if arch not in _REGISTRY:
        raise ValueError(f"unknown SAE architecture {arch!r}; known: {', '.join(available_architectures())}")
    return _REGISTRY[arch]


def options_class(arch: str) -> type:
    """The options dataclass of an architecture (an unknown one is refused, naming the known ones)."""
    return sae_class(arch).options_cls
