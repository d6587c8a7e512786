"""The eval suite: records written beside each SAE, read back into one table, seeds of one recipe pooled and
recipes compared against their seed spread; `saelab evals` on the command line."""

import json
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from saelab.cli import main
from saelab.evals import suite
from saelab.evals.intervals import Interval
from saelab.evals.saebench import saebench_output
from tests.helpers import SMALL_HOOK, saved_small_sae, write_small_saelens

SCORES = {"topk": [0.50, 0.51, 0.52], "relu": [0.70, 0.71, 0.69]}


@dataclass
class FakeEvalConfig:
    resamples: int = 10


class FakeResult:
    def __init__(self, score: float, config):
        self.score, self.config = score, config

    def saebench(self, sae):
        interval = Interval(self.score, self.score - 0.01, self.score + 0.01, 50, "bootstrap")
        return saebench_output("fake_eval", self.config, {"quality": {"score": self.score}}, sae,
                               intervals={"quality.score": interval})


@pytest.fixture
def fake_eval(monkeypatch):
    """A stand-in eval whose score is looked up by the SAE's architecture and seed (its decoder's first value)."""
    module = types.ModuleType("fake_eval")
    module.EVAL_TYPE_ID, module.CONFIG, module.calls = "fake_eval", FakeEvalConfig, []

    def run(sae, model, config=None, *, progress=True):
        module.calls.append((sae.cfg.arch, model, config))
        seed = sae.seen_seed
        return FakeResult(SCORES[sae.cfg.arch][seed], config or FakeEvalConfig())

    module.run = run
    monkeypatch.setitem(sys.modules, "fake_eval", module)
    monkeypatch.setitem(suite.EVALS, "fake_eval", "fake_eval")
    return module


@pytest.fixture
def seeded_folders(tmp_path, monkeypatch):
    """Three seeds of a TopK and of a ReLU SAE saved as folders; loading one tells the fake eval its seed."""
    from saelab import hub

    folders = {(arch, seed): saved_small_sae(tmp_path / f"{arch}-s{seed}", arch, seed=seed)
               for arch in SCORES for seed in range(3)}
    real_load = hub.load_sae

    def load(folder, **kwargs):
        sae = real_load(folder, **kwargs)
        sae.seen_seed = int(str(folder).rsplit("-s", 1)[1])
        return sae

    monkeypatch.setattr(hub, "load_sae", load)
    return folders


def test_run_suite_writes_each_record_beside_its_sae_and_loads_each_model_once(fake_eval, seeded_folders):
    folders = [seeded_folders["topk", 0], seeded_folders["relu", 1]]
    loaded = []
    results = suite.run_suite(folders, ["fake_eval"], load_model=lambda sae, f: loaded.append(f) or "model")
    assert len(loaded) == 1 and [call[1] for call in fake_eval.calls] == ["model", "model"]
    record = json.loads((folders[1] / "evals" / "fake_eval.json").read_text())
    assert record["eval_result_metrics"] == {"quality": {"score": 0.71}}
    again = suite.read_suite(folders)
    assert [r.headline()["fake_eval: quality.score"].estimate for r in again] == [0.50, 0.71]
    table = suite.suite_table(results)
    assert "| fake_eval: quality.score |" in table and "0.500 [0.490, 0.510]" in table


def test_seeds_of_one_recipe_are_pooled_and_recipes_compared_against_their_spread(fake_eval, seeded_folders):
    results = suite.run_suite(list(seeded_folders.values()), ["fake_eval"], load_model=lambda sae, f: None)
    groups = suite.recipes(results)
    assert sorted(len(g) for g in groups.values()) == [3, 3]
    pooled = {name.split("-")[0]: suite.pooled(group)["fake_eval: quality.score"] for name, group in groups.items()}
    assert pooled["topk"].estimate == pytest.approx(0.51) and pooled["topk"].n == 3
    assert pooled["relu"].std == pytest.approx(0.01)
    table = suite.seeds_table(results)
    assert "beyond the seed spread" in table and "(sd 0.01, n=3)" in table


def test_an_unknown_eval_is_refused_before_any_sae_loads(tmp_path):
    with pytest.raises(ValueError, match="no eval named 'nope'"):
        suite.run_suite([tmp_path / "missing"], ["nope"])


def test_saelab_evals_runs_the_suite_and_pools_seeds(fake_eval, seeded_folders, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("saelab.models.load_model", lambda name, **kw: f"loaded {name}")
    folders = [str(seeded_folders["topk", s]) for s in range(3)]
    assert main(["evals", *folders, "--suite", "fake_eval", "--as-seeds", "--resamples", "7",
                 "--out", str(tmp_path / "records")]) == 0
    printed = capsys.readouterr().out
    assert "0.510 [" in printed and "(3 seeds)" in printed
    assert fake_eval.calls[0][1] == "loaded smollm2-135m" and fake_eval.calls[0][2] == FakeEvalConfig(resamples=7)
    assert len(list((tmp_path / "records").glob("*/evals/fake_eval.json"))) == 3
    assert not (seeded_folders["topk", 0] / "evals").exists()  # --out: nothing written beside the SAEs


def test_saelab_evals_hook_lets_saes_trained_on_cached_activations_be_evaluated(monkeypatch, capsys, tmp_path):
    """A SAELens SAE trained outside a model run names no model or hook; a sparsify one names its trainer's hook
    point ("acts"). --model and --hook say what they read, and every eval then runs on them."""
    from safetensors.torch import save_file

    saelens = write_small_saelens(tmp_path / "saelens", hook_name=None, model_name=None)
    sparsify = tmp_path / "sparsify" / "acts"
    sparsify.mkdir(parents=True)
    (sparsify / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": 16, "k": 3, "d_in": 8}))
    save_file({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16), "W_dec": torch.randn(16, 8),
               "b_dec": torch.zeros(8)}, str(sparsify / "sae.safetensors"))
    module = types.ModuleType("hook_eval")
    module.EVAL_TYPE_ID, module.CONFIG, module.hooks = "fake_eval", FakeEvalConfig, []
    module.run = lambda sae, model, config=None, progress=True: module.hooks.append(sae.cfg.hook_name) or \
        FakeResult(0.5, config or FakeEvalConfig())
    monkeypatch.setitem(sys.modules, "hook_eval", module)
    monkeypatch.setitem(suite.EVALS, "hook_eval", "hook_eval")
    monkeypatch.setattr("saelab.models.load_model", lambda name, **kw: name)

    assert main(["evals", str(saelens), "--suite", "hook_eval"]) != 0
    assert "names none); pass --model" in capsys.readouterr().err
    assert main(["evals", str(saelens), str(sparsify), "--suite", "hook_eval", "--model", "smollm2-135m",
                 "--hook", SMALL_HOOK]) == 0
    assert module.hooks == [SMALL_HOOK, SMALL_HOOK]
    record = json.loads((sparsify / "evals" / "fake_eval.json").read_text())
    assert record["sae_cfg_dict"]["hook_name"] == SMALL_HOOK
    assert "sparsify/acts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="hook_name"):  # the name is checked as any SAE's config checks it
        suite.run_suite([saelens], ["hook_eval"], hook="../runs", load_model=lambda sae, folder: None)


def test_saelab_evals_help_names_every_eval(capsys):
    with pytest.raises(SystemExit):
        main(["evals", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in suite.EVALS)


def test_saelab_evals_reads_the_text_after_the_training_cache(fake_eval, seeded_folders, monkeypatch, tiny_cache):
    from saelab.activations import ActivationStore
    from saelab.commands import evals as command

    seen = []
    monkeypatch.setattr("saelab.models.load_model", lambda name, **kw: None)
    monkeypatch.setattr(command, "eval_config", lambda module, settings: seen.append(settings["text"]))
    assert main(["evals", str(seeded_folders["topk", 0]), "--suite", "fake_eval", "--acts", str(tiny_cache)]) == 0
    assert seen == [ActivationStore(tiny_cache).held_out_text()] and seen[0].start > 0


@pytest.mark.filterwarnings("ignore::saelab.training.landing.OffTarget")  # 4 steps: L0 has no time to settle
def test_recipes_are_told_apart_by_how_they_were_trained_not_by_the_format_they_were_saved_in(tmp_path, tiny_cache):
    """A BatchTopK SAE is saved as a JumpReLU: its seeds must pool with BatchTopK's, not with a JumpReLU recipe."""
    from saelab import SAESpec, TrainConfig, train
    from saelab.hub.folder import read_run_keys

    specs = [SAESpec(arch="batchtopk", width=32, k=4, hook="blocks.0.hook_resid_post"),
             SAESpec(arch="jumprelu", width=32, hook="blocks.0.hook_resid_post", options={"target_l0": 4})]
    folders = []
    for seed in (0, 1):
        trained = train(tiny_cache, specs, TrainConfig(tokens=1024, batch_size=256, seed=seed),
                        out=tmp_path / f"seed{seed}", progress=False)
        folders += [t.folder for t in trained]
    assert read_run_keys(folders[0])["saelab_recipe"] == "batchtopk-32-k4"
    results = suite.read_suite(folders)
    assert {r.recipe["arch"] for r in results} == {"jumprelu"}  # both saved as JumpReLU
    assert sorted(suite.recipes(results)) == ["batchtopk-32-k4 (2 seeds)", "jumprelu-32-target4 (2 seeds)"]
