"""Training: one activation stream feeds several SAEs; checkpoints resume exactly."""

from saelab.training.config import SAESpec, TrainConfig
from saelab.training.run import NotEvaluated, train
from saelab.training.trainer import TrainedSAE, Trainer

__all__ = ["NotEvaluated", "SAESpec", "TrainConfig", "TrainedSAE", "Trainer", "train"]
