"""saelab: sparse autoencoders for mechanistic interpretability."""

__version__ = "0.1.0"

from saelab.activations import ActivationBatch, ActivationStore, Manifest, ModelStream, cache_activations  # noqa: E402
from saelab.data import TextConfig, iter_documents  # noqa: E402
from saelab.eval import EvalResult, evaluate  # noqa: E402
from saelab.errors import CacheError, DataError, HookError, ModelError, SaelabError  # noqa: E402
from saelab.models import LanguageModel, load_model  # noqa: E402
from saelab.hub import HubError, from_pretrained, load_sae, push_to_hub, save_sae  # noqa: E402
from saelab.sae import SAE, SAEConfig, create_sae  # noqa: E402
from saelab.training import SAESpec, TrainConfig, train  # noqa: E402
