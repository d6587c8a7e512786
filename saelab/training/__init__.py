"""Training: one activation stream feeds several SAEs; checkpoints resume exactly."""

from saelab.training.config import SAESpec, TrainConfig
from saelab.training.trainer import TrainedSAE, Trainer, train

__all__ = ["SAESpec", "TrainConfig", "TrainedSAE", "Trainer", "train"]
