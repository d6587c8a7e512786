"""saelab: sparse autoencoders for mechanistic interpretability."""

import saelab.progress_bars  # noqa: F401  (first: quiets tqdm.auto's ipywidgets warning before anything imports it)
from saelab.activations import ActivationBatch, ActivationStore, Manifest, ModelStream, cache_activations
from saelab.data import TextConfig, iter_documents
from saelab.evals.core import EvalResult, evaluate
from saelab.errors import CacheError, DataError, HookError, ModelError, SaelabError
from saelab.models import LanguageModel, load_model
from saelab.hub import HubError, from_pretrained, load_sae, push_to_hub, save_sae
from saelab.runs import runs_folder
from saelab.sae import SAE, SAEConfig, create_sae
from saelab.training import SAESpec, TrainConfig, train
from saelab.version import __version__
