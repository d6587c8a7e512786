"""train(): one Trainer run, then every SAE saved and, given a model and held-out text, evaluated."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from saelab.files import inside
from saelab.training.config import SAESpec, TrainConfig
from saelab.training.landing import OffTarget, describe, landing
from saelab.training.trainer import Trainer, TrainedSAE


class NotEvaluated(UserWarning):
    """An SAE was trained and saved, but the evaluation asked for could not run."""


def train(source, saes: list[SAESpec | dict], config: TrainConfig | None = None, *, out: str | Path | None = None,
          resume: bool = True, progress: bool = True, model=None, eval_text=None,
          eval_tokens: int = 4096) -> list[TrainedSAE]:
    """Train every SAE in `saes` on one activation stream.

    source: a cache folder (read in the order config.seed gives), an ActivationStore or ModelStream, or batches you
        hold: any iterable of ActivationBatches with .hooks, .d and .batch_size (saelab.activations.open_source).
    out: checkpoint there (and resume from it), then save each SAE to out/<hook>/<arch>-<width>[-k<k>]/. A folder
        there that holds files but no SAE saelab wrote is refused before training starts.
    model + eval_text: then evaluate each SAE on that held-out text (reconstruction, sparsity, spliced CE/KL) and add
        the metrics to its folder (metrics.json). Every SAE is saved before any is evaluated: one whose evaluation
        cannot run (the text ran out, say) stays saved, with a NotEvaluated warning and `not_evaluated` saying why.
        The clean and ablated losses, the same for every SAE at a hook, are computed once per hook. A transcoder is
        evaluated on its target: target FVU, and CE / KL with the target replaced by its output.
    """
    from saelab.hub.folder import check_sae_folder, save_sae
    from saelab.hub.saelens import source_metadata

    trainer = Trainer(source, saes, config, out=out, resume=resume, progress=progress)
    folders = {m.name: inside(out, m.name, "SAE folder") for m in trainer.members} if out is not None else {}

    def check_folders() -> None:  # before the training, not after it
        for folder in folders.values():
            check_sae_folder(folder)

    with trainer.locked():  # through the saving too: a second process must not write the same SAE folders
        trainer.world.main_first(check_folders, "use the SAE folders")
        trained = trainer.fit()
        if not trainer.world.main:  # rank 0 alone saves and evaluates
            return trained
        metadata = source_metadata(trainer.source.fingerprint())  # the text, context length and BOS of the run
        for result in trained:  # all saved first: an evaluation that fails must cost no trained SAE
            if out is not None:
                recipe = {"saelab_recipe": Path(result.name).name}  # batchtopk-4608-k32: saved as JumpReLU, trained as this
                result.folder = save_sae(result.sae, folders[result.name], metadata={**metadata, **recipe})
        to_evaluate = trained if model is not None and eval_text is not None else []
        if to_evaluate and progress:
            print(f"saelab: evaluating {len(to_evaluate)} SAE{'s' if len(to_evaluate) > 1 else ''} on "
                  f"{eval_tokens:,} held-out tokens (the clean and zero-ablated losses once per hook)", file=sys.stderr)
        baselines = _baselines({_replaced_hook(r) for r in to_evaluate}, model, eval_text, eval_tokens, progress)
        for result in to_evaluate:
            _evaluate(result, model, eval_text, eval_tokens, baselines[_replaced_hook(result)], progress)
    return trained


def _replaced_hook(result: TrainedSAE) -> str:
    """The hook its evaluation replaces, where the ablations are compared: a transcoder's target, an SAE's own."""
    return result.sae.cfg.target_hook if result.sae.cfg.is_transcoder else result.hook


def _baselines(hooks: set[str], model, text, tokens: int, progress: bool) -> dict:
    """{hook: Baselines, or the error that stopped them (each SAE at that hook then reports it)}."""
    from saelab.errors import SaelabError
    from saelab.evals.core import Baselines

    found = {}
    for hook in sorted(hooks):
        try:
            found[hook] = Baselines.compute(model, text, hook, tokens=tokens, progress=progress)
        except (SaelabError, ValueError, OSError) as error:
            found[hook] = error
    return found


def _evaluate(result: TrainedSAE, model, text, tokens: int, baselines, progress: bool = True) -> None:
    """Evaluate a trained SAE and add the metrics to its folder; if the evaluation cannot run (the held-out text ran
    out, a file is gone), say why in `result.not_evaluated` and a warning, and leave the saved SAE as it is."""
    from saelab.errors import SaelabError
    from saelab.evals.core import evaluate
    from saelab.hub.folder import save_metrics

    try:
        if isinstance(baselines, Exception):
            raise baselines
        result.metrics = evaluate(result.sae, model=model, text=text, tokens=tokens, baselines=baselines,
                                  progress=progress)
    except (SaelabError, ValueError, OSError) as error:
        why = str(error) + (f" (read from context {text.start:,} on, past the text the SAE was trained on)"
                            if getattr(text, "start", 0) else "")
        result.not_evaluated = why
        how = f"saelab eval {result.folder} --text FILE" if result.folder else "saelab.evaluate(sae, model=, text=)"
        warnings.warn(f"saelab: SAE {result.name} was trained{' and saved' if result.folder else ''} but not "
                      f"evaluated: {why}. Evaluate it on other held-out text with {how}", NotEvaluated, stacklevel=3)
        return
    if result.l0 is not None:  # metrics.json says whether the SAE landed, on this text too
        _add_held_out_l0(result)
        result.metrics.l0_target = result.l0
    if result.folder is not None:
        save_metrics(result.folder, result.metrics, result.sae.cfg.width)


def _add_held_out_l0(result: TrainedSAE) -> None:
    """Judge the landing on the evaluation's held-out L0 too; warn if only that one is off target."""
    held_out = result.metrics.reconstruction.l0 if result.metrics.reconstruction is not None else None
    known = result.l0
    result.l0 = landing(known["target"], known["training"], held_out)
    if result.l0["off_target"] and not known["off_target"]:
        warnings.warn(f"saelab: {describe(result.name, result.l0)}", OffTarget, stacklevel=4)
