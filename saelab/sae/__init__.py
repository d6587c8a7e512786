"""SAE architectures: one file each, all built from an SAEConfig through the registry.

    sae = create_sae(SAEConfig(arch="topk", d_in=576, width=4608, k=32))
    sae = create_sae(SAEConfig(arch="relu", d_in=576, width=4608, options={"target_l0": 32}))
    training = create_training(sae)            # loss(), training-only state, export() for batchtopk
"""
import importlib
import pkgutil

from .config import Options, SAEConfig, create_sae, create_training
from .base import (SAE, AuxKOptions, SteeredOptions, Training, TrainOutput, auxk_loss, estimate_input_scale,
                   geometric_median)
from .registry import available_architectures, options_class, register, sae_class
from .relu import ReLUOptions, ReLUSAE, ReLUTraining
from .topk import TopKOptions, TopKSAE, TopKTraining
from .jumprelu import JumpReLUOptions, JumpReLUSAE, JumpReLUTraining
from .batchtopk import BatchTopKOptions, BatchTopKSAE, BatchTopKTraining
from .matryoshka import MatryoshkaOptions, MatryoshkaSAE, MatryoshkaTraining

for _module in pkgutil.iter_modules(__path__):  # every architecture file registers itself when imported, so a new
    importlib.import_module(f"{__name__}.{_module.name}")  # file needs no line here (the names above are re-exports)

__all__ = [
    "SAE", "SAEConfig", "Options", "Training", "TrainOutput", "auxk_loss", "estimate_input_scale",
    "geometric_median", "available_architectures", "create_sae", "create_training", "options_class", "register",
    "sae_class", "SteeredOptions", "AuxKOptions",
    "ReLUOptions", "ReLUSAE", "ReLUTraining", "TopKOptions", "TopKSAE", "TopKTraining",
    "JumpReLUOptions", "JumpReLUSAE", "JumpReLUTraining", "BatchTopKOptions", "BatchTopKSAE", "BatchTopKTraining",
    "MatryoshkaOptions", "MatryoshkaSAE", "MatryoshkaTraining",
]
