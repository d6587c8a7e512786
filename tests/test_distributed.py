"""torch.distributed on the CPU: 2 gloo ranks of `python -m saelab`, each started the way torchrun starts it (RANK,
WORLD_SIZE, MASTER_ADDR / MASTER_PORT), checked against one process doing the same job."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from saelab.activations import ActivationStore, Manifest, cache_activations
from saelab.cli import main
from saelab.data import TextConfig

HOOK = "blocks.0.hook_resid_post"
CACHE = dict(tokens=4000, shard_tokens=512, context_len=32)
TRAIN = ["--arch", "topk", "--width", "64", "--k", "4", "--batch-size", "64", "--eval-tokens", "0", "--log-every", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], folder, world: int = 2, per_rank=None) -> list[subprocess.Popen]:
    """`world` ranks of `python -m saelab *args` (per_rank(r) adds arguments; args ["-c", code] runs Python code
    instead), output in folder/rank<r>.log."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SAELAB_DIST_TIMEOUT": "60",
               "OMP_NUM_THREADS": "1"}
        log = open(folder / f"rank{rank}.log", "w")
        extra = per_rank(rank) if per_rank else []
        command = [*args, *extra] if args[0] == "-c" else ["-m", "saelab", *args, *extra]
        procs.append(subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def finish(procs, folder, timeout: float = 180) -> list[tuple[int, str]]:
    """(return code, output) of each rank; a rank still running after `timeout` fails the test (a hang)."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} hung")
        results.append((proc.returncode, (folder / f"rank{rank}.log").read_text()))
    return results


def saved(run) -> dict[str, torch.Tensor]:
    return {f"{path.parent.name}.{k}": v for path in sorted(run.glob("*/*/sae_weights.safetensors"))
            for k, v in load_file(path).items()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def log_lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_store_ranks_take_equal_slices_of_the_same_batches(tiny_cache):
    whole = list(ActivationStore(tiny_cache, batch_size=64))
    shares = [list(ActivationStore(tiny_cache, batch_size=64, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole)  # equal step counts: no rank waits for ever
    for batch, a, b in zip(whole, *shares):
        assert len(a) == len(b) == 32
        assert torch.equal(torch.cat([a.rows, b.rows]), batch.rows)
        assert torch.equal(torch.cat([a.acts[HOOK], b.acts[HOOK]]), batch.acts[HOOK])


def test_two_ranks_train_the_weights_one_process_trains(tiny_cache, tmp_path):
    """Gradients, AuxK's batch variance, dead clocks, the first-batch scale and b_dec, and the steered L0 of a
    ReLU / JumpReLU are all whole-batch quantities: 2 ranks on half batches must end where 1 process ends."""
    args = ["train", "--acts", str(tiny_cache), *TRAIN, "--arch", "topk,relu,jumprelu", "--tokens", str(24 * 64),
            "--dead-tokens", "64", "--checkpoint-every", "12"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    results = finish(launch([*args, "--out", str(tmp_path / "two")], tmp_path), tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert_same_weights(saved(tmp_path / "one"), saved(tmp_path / "two"))
    one, two = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # rank 0 alone wrote the log: no line twice
    topk = f"{HOOK}/topk-64-k4"
    assert any(r[topk]["aux"] > 0 for r in one)  # AuxK ran, so its cross-rank variance was exercised
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]
        for name in (topk, f"{HOOK}/relu-64-target32"):
            for key in ("mse", "l0", "aux", "fvu", "dead"):
                assert b[name][key] == pytest.approx(a[name][key], rel=1e-4, abs=1e-6), (a["step"], name, key)
    assert not (tmp_path / "two" / "checkpoint.tmp").exists()


def test_a_two_rank_cache_is_the_one_process_cache_token_for_token(tiny_model, tiny_model_dir, tmp_path):
    reference = tmp_path / "one"
    cache_activations(tiny_model, HOOK, reference, text=TextConfig(context_len=CACHE["context_len"]),
                      tokens=CACHE["tokens"], shard_tokens=CACHE["shard_tokens"], progress=False)
    args = ["cache", "--model", str(tiny_model_dir), "--hooks", HOOK, "--out", str(tmp_path / "two"),
            "--tokens", str(CACHE["tokens"]), "--shard-tokens", str(CACHE["shard_tokens"]),
            "--context-len", str(CACHE["context_len"])]
    results = finish(launch(args, tmp_path), tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    one, two = Manifest.read(reference), Manifest.read(tmp_path / "two")
    assert two.complete and len(two.shards) == len(one.shards) > 2
    assert two.run == one.run and two.n_contexts == one.n_contexts
    for a, b in zip(one.shards, two.shards):
        assert (a.index, a.contexts, a.rows) == (b.index, b.contexts, b.rows)
        x, y = load_file(reference / a.file), load_file(tmp_path / "two" / b.file)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    batch = next(iter(ActivationStore(tmp_path / "two", batch_size=256, shuffle=False)))  # read as any cache
    assert torch.equal(batch.acts[HOOK], next(iter(ActivationStore(reference, batch_size=256, shuffle=False))).acts[HOOK])


def test_a_killed_rank_stops_the_other_and_the_run_resumes_on_one_process(tiny_cache, tmp_path):
    args = ["train", "--acts", str(tiny_cache), *TRAIN, "--tokens", str(60 * 64), "--checkpoint-every", "10"]
    out = tmp_path / "two"
    procs = launch([*args, "--out", str(out)], tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint").exists() and time.monotonic() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    assert (out / "checkpoint").exists(), (tmp_path / "rank0.log").read_text()[-3000:]
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    (rc, output), _ = finish(procs, tmp_path, timeout=90)
    assert rc == 2 and time.monotonic() - killed_at < 70  # within SAELAB_DIST_TIMEOUT, not a hang
    assert "rank 0: the other ranks stopped answering" in output and "Rerun the same command" in output
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] >= 10
    # rerun on another number of ranks (one): it resumes and ends where an uninterrupted run ends
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(saved(tmp_path / "one"), saved(out))
    assert [r["step"] for r in log_lines(out)] == list(range(5, 61, 5))


def test_ranks_started_with_different_settings_are_refused(tiny_cache, tiny_model_dir, tmp_path):
    args = ["train", "--acts", str(tiny_cache), *TRAIN, "--tokens", str(4 * 64), "--out", str(tmp_path / "run")]
    results = finish(launch(args, tmp_path, per_rank=lambda r: ["--lr", f"{1e-3 * (r + 1)}"]), tmp_path)
    for rank, (rc, output) in enumerate(results):
        assert rc == 2 and "ranks were started with different training settings" in output, output[-2000:]
    assert not (tmp_path / "run" / "checkpoint").exists()
    args = ["cache", "--model", str(tiny_model_dir), "--hooks", HOOK, "--out", str(tmp_path / "acts")]
    results = finish(launch(args, tmp_path, per_rank=lambda r: ["--tokens", str(1000 * (r + 1))]), tmp_path)
    for rank, (rc, output) in enumerate(results):
        assert rc == 2 and "ranks were started with different cache settings" in output, output[-2000:]
    assert not (tmp_path / "acts").exists()


def test_saes_spread_over_ranks_train_as_in_one_process_and_batchtopk_refuses_data_parallel(tiny_cache, tmp_path):
    args = ["train", "--acts", str(tiny_cache), *TRAIN, "--arch", "topk,batchtopk", "--tokens", str(20 * 64),
            "--dead-tokens", "64", "--checkpoint-every", "10"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    results = finish(launch([*args, "--out", str(tmp_path / "two"), "--parallel", "saes"], tmp_path), tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert_same_weights(saved(tmp_path / "one"), saved(tmp_path / "two"), atol=1e-6)
    assert log_lines(tmp_path / "one") == log_lines(tmp_path / "two")  # rank 0 logged rank 1's SAE too
    shutil.rmtree(tmp_path / "two")
    results = finish(launch([*args, "--out", str(tmp_path / "two")], tmp_path), tmp_path)
    for rc, output in results:
        assert rc == 2 and "train them with parallel='saes'" in output, output[-2000:]


STREAM_RUN = """
import sys
from saelab import distributed
from saelab.activations import ModelStream
from saelab.data import TextConfig
from saelab.models import load_model
from saelab.training import TrainConfig, train
from saelab.training.trainer import run_share, source_share

config = TrainConfig(tokens=12 * 64, batch_size=64, dead_tokens=64, log_every=4, checkpoint_every=6)
distributed.init()
stream = ModelStream(load_model(sys.argv[1]), "blocks.0.hook_resid_post", TextConfig(context_len=32),
                     batch_size=64, buffer_tokens=512, model_batch_size=4, **source_share(run_share(config), stream=True))
train(stream, [dict(arch="topk", width=64, k=4)], config, out=sys.argv[2], progress=False)
distributed.finish()
"""


@pytest.mark.slow  # three more processes running the model: kept out of the fast tier's minute
def test_two_ranks_share_the_model_forwards_of_a_live_stream(tiny_model_dir, tmp_path):
    """gather=True: each rank runs every other chunk of contexts through the model, and together they train on the
    batches one process streams."""
    args = ["-c", STREAM_RUN, str(tiny_model_dir)]
    subprocess.run([sys.executable, *args, str(tmp_path / "one")], check=True, capture_output=True)
    results = finish(launch([*args, str(tmp_path / "two")], tmp_path), tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert_same_weights(saved(tmp_path / "one"), saved(tmp_path / "two"))
    assert [r["tokens"] for r in log_lines(tmp_path / "two")] == [r["tokens"] for r in log_lines(tmp_path / "one")]


@pytest.mark.slow  # a longer cache, killed midway: kept out of the fast tier's minute
def test_a_killed_cache_rank_stops_the_other_and_a_rerun_keeps_the_listed_shards(tiny_model, tiny_model_dir, tmp_path):
    out = tmp_path / "two"
    args = ["cache", "--model", str(tiny_model_dir), "--hooks", HOOK, "--out", str(out), "--tokens", "16000",
            "--shard-tokens", "256", "--context-len", "32"]
    procs = launch(args, tmp_path)
    deadline = time.monotonic() + 120
    listed = []
    while len(listed) < 8 and time.monotonic() < deadline and procs[0].poll() is None:
        try:
            listed = Manifest.read(out).shards
        except Exception:  # not written yet
            pass
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    (rc, output), _ = finish(procs, tmp_path, timeout=90)
    assert rc == 2 and "the other ranks stopped answering" in output
    kept = {s.index: s.sha256 for s in Manifest.read(out).shards}
    assert {1, 3, 5} <= kept.keys()  # rank 1's shards were listed as the run went
    assert main(args) == 0  # one process finishes it, recomputing only what is not listed
    finished = Manifest.read(out)
    assert finished.complete and all(kept[s.index] == s.sha256 for s in finished.shards if s.index in kept)
    reference = tmp_path / "one"
    cache_activations(tiny_model, HOOK, reference, text=TextConfig(context_len=32), tokens=16000, shard_tokens=256,
                      progress=False)
    for a, b in zip(Manifest.read(reference).shards, finished.shards, strict=True):
        x, y = load_file(reference / a.file), load_file(out / b.file)
        assert all(torch.equal(x[k], y[k]) for k in x)
