"""Activations: cache them to disk (sharded, resumable, checksummed) or stream them from the model."""

from saelab.activations.manifest import Manifest
from saelab.activations.source import ActivationSource, IterableSource, open_source
from saelab.activations.store import ActivationBatch, ActivationStore
from saelab.activations.stream import ModelStream
from saelab.activations.writer import cache_activations

__all__ = ["ActivationBatch", "ActivationSource", "ActivationStore", "IterableSource", "Manifest", "ModelStream",
           "cache_activations", "open_source"]
