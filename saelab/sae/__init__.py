"""SAE architectures: one file each, all built from an SAEConfig through the registry.

    sae = create_sae(SAEConfig(arch="topk", d_in=576, width=4608, k=32))
    training = create_training(sae)            # loss(), training-only state, export() for batchtopk
"""
from .base import (SAE, SAEConfig, Training, TrainOutput, auxk_loss, estimate_input_scale, geometric_median,
                   sparse_decode)
from .registry import available_architectures, create_sae, create_training, register, sae_class
from .relu import ReLUSAE, ReLUTraining
from .topk import TopKSAE, TopKTraining
from .jumprelu import JumpReLUSAE, JumpReLUTraining
from .batchtopk import BatchTopKSAE, BatchTopKTraining
from .matryoshka import MatryoshkaSAE, MatryoshkaTraining

__all__ = [
    "SAE", "SAEConfig", "Training", "TrainOutput", "auxk_loss", "estimate_input_scale", "geometric_median",
    "sparse_decode",
    "available_architectures", "create_sae", "create_training", "register", "sae_class",
    "ReLUSAE", "ReLUTraining", "TopKSAE", "TopKTraining", "JumpReLUSAE", "JumpReLUTraining",
    "BatchTopKSAE", "BatchTopKTraining", "MatryoshkaSAE", "MatryoshkaTraining",
]
