"""Architecture name -> SAE class. Each architecture file registers itself with @register("name")."""
from __future__ import annotations

from typing import Any

import torch

from .base import SAE, SAEConfig, Training

_REGISTRY: dict[str, type[SAE]] = {}


def register(name: str):
    """Class decorator: make `create_sae(SAEConfig(arch=name, ...))` build this class."""

    def add(cls: type[SAE]) -> type[SAE]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE architecture {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.arch = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_architectures() -> list[str]:
    return sorted(_REGISTRY)


def sae_class(arch: str) -> type[SAE]:
    if arch not in _REGISTRY:
        raise ValueError(f"unknown SAE architecture {arch!r}; known: {', '.join(available_architectures())}")
    return _REGISTRY[arch]


def create_sae(cfg: SAEConfig | dict[str, Any], device: torch.device | str | None = None) -> SAE:
    """A freshly initialised SAE for `cfg` (an SAEConfig or its dict form)."""
    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    return sae_class(cfg.arch)(cfg, device=device)


def create_training(sae: SAE) -> Training:
    """The training objective (and training-only state) that goes with this SAE's architecture."""
    return type(sae).training_cls(sae)
