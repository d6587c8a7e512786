"""Training: one activation stream feeds several SAEs; checkpoints resume exactly."""

from saelab.train.config import SAESpec, TrainConfig
from saelab.train.trainer import TrainedSAE, Trainer, train

__all__ = ["SAESpec", "TrainConfig", "TrainedSAE", "Trainer", "train"]
