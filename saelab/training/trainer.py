"""Train several SAEs from one activation stream: each batch (one model forward, or one read of the cache) feeds
every SAE, whatever its hook, width, k or architecture. A transcoder (SAESpec.target_hook) reads its input hook and
its target hook from the same batch, so they come from the same tokens.

A step, for each SAE: scale the inputs, compute the architecture's loss (AuxK sees the latents dead for
`dead_window` tokens), step Adam with the decoder's parallel gradient removed, renormalise the decoder rows.
Checkpoints hold everything a step depends on, so a resumed run ends with the same weights as an uninterrupted one.
Under torchrun (saelab.distributed), TrainConfig.parallel picks what the ranks share: 'data' (each rank an equal
slice of every batch, gradients and batch statistics averaged: the same weights as one process, to rounding) or
'saes' (each rank trains its own SAEs on whole batches). Either way the state is global, so rank 0 alone writes
checkpoints, logs and SAEs, and a run resumes on any number of ranks.
A run that diverged (reconstructs worse than the mean, or nearly all latents dead) is stopped with TrainingError
before it is exported, not saved as a success.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from saelab import distributed
from saelab.activations import ActivationBatch
from saelab.activations.source import check_share, open_source, run_share
from saelab.activations.source import source_share  # noqa: F401 (importable from here too)
from saelab.errors import HookError, TrainingError
from saelab.files import FolderLock
from saelab.options import from_mapping
from saelab.sae import SAE, SAEConfig, create_sae, create_training
from saelab.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from saelab.training.config import SAESpec, TrainConfig
from saelab.training.diagnosis import why_not_finite
from saelab.training.landing import OffTarget, describe
from saelab.training.log import RunLog, plain, postfix
from saelab.training.member import Member, fused_adam, load_member_state, member_state

MAX_FVU = 1.0
"""A training FVU above this (worse than predicting the batch mean) at the end of a run means it diverged."""
MAX_DEAD = 0.9
"""More than this fraction of latents dead at the end of a run means it collapsed."""


@dataclass
class TrainedSAE:
    """A finished SAE for inference (input scale folded in), with where it came from and how it did."""

    name: str
    hook: str
    sae: SAE
    steps: int
    metrics: object | None = None  # saelab.evals.core.EvalResult, when evaluated
    folder: Path | None = None  # where it was saved
    not_evaluated: str | None = None
    """Why an evaluation that was asked for could not run (the held-out text ran out, say); the SAE is saved."""
    l0: dict | None = None
    """Where its L0 landed against the L0 asked for, held-out L0 included once evaluated (saelab.training.landing);
    None for a fixed sparsity coefficient."""


class Trainer:
    def __init__(self, source, specs: list[SAESpec | dict], config: TrainConfig | None = None, *,
                 out: str | Path | None = None, resume: bool = True, progress: bool = True, on_checkpoint=None):
        self.config = config or TrainConfig()
        self.world = distributed.current()
        self.device = distributed.local_device(self.config.device, self.world)
        self.data_parallel = self.world.distributed and self.config.parallel == "data"
        self.source = open_source(source, batch_size=self.config.batch_size, seed=self.config.seed,
                                  share=run_share(self.config))
        """A cache folder is read in the order config.seed gives, as `saelab train --acts --seed` reads it; an
        iterable of ActivationBatches you hold (with .hooks, .d, .batch_size) is read as it comes."""
        check_share(self.source, self.world, self.data_parallel)
        if self.source.batch_size != self.config.batch_size:
            raise ValueError(f"the activation source gives batches of {self.source.batch_size} but "
                             f"TrainConfig.batch_size is {self.config.batch_size}")
        self.specs = [s if isinstance(s, SAESpec) else from_mapping(SAESpec, s, f"saes[{i}]") for i, s in enumerate(specs)]
        if not self.specs:
            raise ValueError("give at least one SAE to train")
        self.out = Path(out) if out is not None else None
        self.resume, self.progress = resume, progress
        self.on_checkpoint = on_checkpoint  # called with the trainer before each checkpoint: score it mid-run
        self.members = [self._member(spec, hook) for spec in self.specs for hook in self._hooks_of(spec)]
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"two SAEs would share a name: {names}; give them different widths, k's or hooks")
        spread = self.world.distributed and not self.data_parallel
        self.mine = [m for i, m in enumerate(self.members) if not spread or i % self.world.size == self.world.rank]
        """The SAEs this rank trains: all of them, unless parallel='saes' spreads them over the ranks."""
        if self.data_parallel:
            _check_data_parallel(self.members)
        self.step = 0
        self.batches_read = 0
        self.skipped = 0
        self.tokens = 0
        """Rows trained on so far (exact, whatever the batches' sizes): becomes each SAE's training_tokens."""
        self._started = False
        self._lock: FolderLock | None = None

    def _hooks_of(self, spec: SAESpec) -> list[str]:
        """The hooks `spec` trains an SAE on: its own, else every hook of the source (one SAE each)."""
        hooks = list(self.source.hooks)
        if spec.hook is not None and spec.hook not in hooks:
            raise HookError(f"SAE {spec.name()} reads hook {spec.hook!r}, but the activations hold {', '.join(hooks)}")
        if spec.target_hook is not None and spec.target_hook not in hooks:
            raise HookError(f"transcoder {spec.name()} reconstructs target hook {spec.target_hook!r}, but the "
                            f"activations hold {', '.join(hooks)}; cache or stream that hook too")
        return [spec.hook] if spec.hook is not None else hooks

    def _member(self, spec: SAESpec, hook: str) -> Member:
        options = dict(spec.options)
        d_in = options.pop("d_in", self.source.d[hook])
        if d_in != self.source.d[hook]:
            raise ValueError(f"SAE {spec.name()} expects d_in={d_in} but hook {hook} gives {self.source.d[hook]}")
        common = {key: options.pop(key) for key in SAEConfig.common_keys() if key in options}  # dtype, skip
        joined = getattr(self.source, "parts", {})  # joined hooks' parts (saelab.activations.joined.JoinedSource)
        target = {} if spec.target_hook is None else dict(target_hook=spec.target_hook, d_out=self.source.d[
            spec.target_hook], target_parts=joined.get(spec.target_hook))  # a cross-layer transcoder's joined target
        cfg = SAEConfig(arch=spec.arch, d_in=d_in, width=spec.width, k=spec.k, hook_name=hook, parts=joined.get(hook),
                        model_name=self.source.model_name, **target, **common, options=options)
        name = f"{hook}/{spec.name()}"  # also the SAE's folder in the run: one folder per hook, as on the Hub
        with torch.random.fork_rng(devices=[]):  # each SAE's init depends on the seed and its name, not on order
            torch.manual_seed(self.config.seed + zlib.crc32(name.encode()))
            sae = create_sae(cfg, device=self.device)
        optimizer, aliases = fused_adam(sae, spec.learning_rate, self.config.adam_betas)
        since = torch.zeros(spec.width, dtype=torch.long, device=self.device)
        training = create_training(sae)
        training.kernel = self.config.kernel
        if self.data_parallel:
            training.across_ranks = self.world.mean
        return Member(name, hook, spec, sae, training, optimizer, since, aliases,
                      collections.deque(maxlen=self.config.log_every), collections.deque(maxlen=self.config.log_every))

    # -- the run
    def fingerprint(self) -> dict:
        config = self.config.to_dict()
        config.pop("allow_diverged")  # accepting a diverged run must not make its own checkpoint "another run"
        config.pop("parallel")  # the state is global either way: resume with any split over any number of ranks
        config.pop("stream_buffer_tokens")  # a stream's own fingerprint holds its buffer; a cache has none
        return {"config": config, "specs": [s.identity() for s in self.specs],
                "data": self.source.fingerprint()}

    @contextlib.contextmanager
    def locked(self):
        """Hold the run folder's lock (re-entrant): one process at a time may write a run (rank 0 for all ranks)."""
        if self.out is None or self._lock is not None:
            yield
            return
        lock = FolderLock(self.out, "training run")
        self.world.main_first(lock.__enter__, f"lock {self.out}")
        self._lock = lock
        try:
            yield
        finally:
            self._lock = None
            lock.__exit__(None, None, None)

    def fit(self) -> list[TrainedSAE]:
        with self.locked():
            return self._fit()

    def _fit(self) -> list[TrainedSAE]:
        self.world.check_same({**self.fingerprint(), "parallel": self.config.parallel}, "training settings or data")
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume:
                self._restore()
        main = self.world.main
        logger = RunLog(self.out if main else None, self.step, self.config.wandb_project if main else None,
                        self.fingerprint())
        bar = tqdm(total=self.config.steps, initial=self.step, desc="training", unit="step",
                   disable=not (self.progress and main))
        try:
            for batch in self._batches():
                if self.step >= self.config.steps:
                    break
                self.batches_read += 1
                self._rows(batch)
                if not self._finite(batch):
                    continue
                outputs = self.train_on(batch)
                bar.update()
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    record = self._record(outputs)
                    if self.step == self.config.steps and (verdicts := self._diverged()):
                        record["diverged"] = verdicts  # marked in the log too, whether or not allow_diverged
                    if self.step == self.config.steps and (missed := self._off_target()):
                        record["off_target"] = missed
                    logger.write(record)
                    bar.set_postfix_str(postfix(record))
                if self.out is not None and (self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps):
                    self.on_checkpoint and self.on_checkpoint(self)
                    self._save()
        finally:
            bar.close()
            logger.close()
        if self.step < self.config.steps:
            raise TrainingError(f"the activations ran out after {self.step} of {self.config.steps} steps")
        self._share_states()
        self._judge()
        if self.tokens < self.config.tokens:
            warnings.warn(f"saelab: trained on {self.tokens} tokens, fewer than TrainConfig.tokens={self.config.tokens}: "
                          f"some batches held fewer than batch_size={self.config.batch_size} rows", stacklevel=3)
        return [self._export(member) for member in self.members]

    def train_on(self, batch: ActivationBatch) -> list:
        """One optimiser step of every SAE on `batch` (the first batch also sets input scales and decoder biases).

        A batch holds, for each hook the SAEs read, [rows, d] activations of the same 1..batch_size tokens; a
        smaller batch (say the last one of your own tensors) is fine: `tokens` counts the rows actually trained on.
        """
        rows = self._rows(batch) * (self.world.size if self.data_parallel else 1)
        if not self._started:
            self._initialise(batch)
        outputs = [self._train_step(member, batch) if any(member is m for m in self.mine) else None
                   for member in self.members]
        self.step += 1
        self.tokens += rows
        return outputs

    def _rows(self, batch: ActivationBatch) -> int:
        """The batch's token count, after checking it holds [rows, d] at every hook read, rows alike and in
        1..batch_size (the LR schedule counts steps of at most batch_size tokens)."""
        rows = {}
        for hook in self._hooks_read():
            acts = batch.acts.get(hook)
            if acts is None:
                raise HookError(f"a batch has no activations for hook {hook!r} (it holds {', '.join(batch.acts)})")
            d = self.source.d[hook]
            if acts.dim() != 2 or acts.shape[1] != d:
                raise ValueError(f"activations at hook {hook} must be [rows, {d}], got {list(acts.shape)}")
            if not 1 <= len(acts) <= self.config.batch_size:
                raise ValueError(f"a batch at hook {hook} has {len(acts)} rows; expected 1 to TrainConfig.batch_size="
                                 f"{self.config.batch_size} (step {self.step})")
            rows[hook] = len(acts)
        if len(set(rows.values())) > 1:
            raise ValueError(f"the hooks of one batch must hold the same tokens, but their row counts differ: {rows}")
        return next(iter(rows.values()))

    def _hooks_read(self) -> list[str]:
        """Every hook a member reads: its input and, for a transcoder, its target."""
        return list(dict.fromkeys(hook for m in self.members for hook in (m.hook, m.target_hook)))

    def _batches(self) -> Iterator[ActivationBatch]:
        """The run's batch sequence from batch number `batches_read` on (across epochs for a cache)."""
        return self.source.batches(self.batches_read)

    def _finite(self, batch: ActivationBatch) -> bool:
        where = None
        for hook in sorted(self._hooks_read()):
            bad = (~torch.isfinite(batch.acts[hook])).any(dim=1)
            if bad.any():
                where = f"{int(bad.sum())} of {len(bad)} tokens at {hook} in batch {self.batches_read - 1} (step {self.step})"
                break
        if self.data_parallel and not self.world.all(where is None):  # every rank skips (or stops) together
            where = where or "on another rank's share of the batch"
        if where is None:
            return True
        if self.config.nan_policy == "error":
            raise TrainingError(f"non-finite activations: {where}; pass nan_policy='skip' (--nan-policy skip) to skip "
                                "such batches")
        self.skipped += 1
        return False

    @torch.no_grad()
    def _initialise(self, batch: ActivationBatch) -> None:
        """From the first batch: the input scale (unit mean squared norm) and the decoder bias of each SAE (from the
        whole batch, gathered from the ranks' shares, so every rank starts where one process would). A transcoder's
        target gets its own scale, and its decoder bias starts at the target's centre."""
        def whole(hook: str) -> torch.Tensor:
            x = batch.acts[hook].to(self.device, torch.float32)
            return self.world.gather(x.to(self.world.device)).to(self.device) if self.data_parallel else x

        for member in self.members:
            member.initialise(x := whole(member.hook), x if member.target_hook == member.hook  # an SAE: once
                              else whole(member.target_hook), self.config.normalize_activations, self.config.b_dec_init)
        self._started = True

    def _train_step(self, member: Member, batch: ActivationBatch):
        cfg = member.sae.cfg
        x = batch.acts[member.hook].to(self.device, torch.float32) * cfg.input_scale
        y = batch.acts[member.target_hook].to(self.device, torch.float32) * cfg.output_scale if cfg.is_transcoder else x
        for group in member.optimizer.param_groups:
            group["lr"] = member.spec.learning_rate * self.config.lr_factor(self.step)
        out = member.training.loss(x, step=self.step, dead=member.dead(self.config.dead_window),
                                   target=y if cfg.is_transcoder else None)
        if not torch.isfinite(out.loss):
            raise TrainingError(f"SAE {member.name}: the loss became {out.loss.item()} at step {self.step}: "
                                + why_not_finite(member, x))
        member.sae.zero_grad(set_to_none=True)
        out.loss.backward()
        world = self.world if self.data_parallel else distributed.SINGLE
        world.average_grads(list(member.sae.parameters()))
        member.sae.remove_parallel_grad_()
        member.step()
        member.sae.normalize_decoder_()
        member.since_fired += len(x) * world.size
        member.since_fired[world.any(out.fired)] = 0
        variance = world.mean((y - world.mean(y.mean(0))).square_().sum(-1).mean())  # the target's: FVU of what it writes
        fvu = float(world.mean(out.mse) / variance) if variance > 0 else None  # one token: no variance to explain
        if fvu is not None:
            member.recent_fvu.append(fvu)
        member.recent_l0.append(float(world.mean(out.l0)))
        return out, fvu

    def _record(self, outputs) -> dict:
        """A log line: every term of every SAE's loss (what the step optimised), as JSON-safe floats and lists."""
        record = {"step": self.step, "tokens": self.tokens,
                  "lr_factor": round(self.config.lr_factor(self.step - 1), 6), "skipped_batches": self.skipped}
        for member, output in zip(self.members, outputs):
            if output is None:  # trained by another rank
                continue
            out, fvu = output
            values = {"loss": out.loss.detach(), "mse": out.mse, "fvu": fvu, "l0": out.l0, "aux": out.aux_loss,
                      "sparsity": out.sparsity_loss, "dead": member.dead(self.config.dead_window).float().mean(),
                      "lr": member.optimizer.param_groups[0]["lr"]}
            if out.prefix_mse is not None:
                values["prefix_mse"] = out.prefix_mse
            values.update(out.extras)
            if self.data_parallel:  # the whole batch's means (fvu is already)
                values = {name: value if name == "fvu" else self.world.mean(torch.as_tensor(value, dtype=torch.float64,
                          device=self.world.device)) for name, value in values.items()}
            record[member.name] = {name: plain(value) for name, value in values.items()}
        if self.world.distributed and not self.data_parallel:  # each rank logged its own SAEs
            for part in self.world.gather_json(record):
                record.update(part)
        return record

    def _diverged(self) -> dict[str, str]:
        """{SAE name: what is wrong} for each SAE whose last steps say it diverged or collapsed."""
        verdicts = {}
        for member in self.mine:
            problems = []
            if member.recent_fvu:
                fvu = sum(member.recent_fvu) / len(member.recent_fvu)
                if not fvu <= MAX_FVU:
                    problems.append(f"training FVU {fvu:.3g} over its last {len(member.recent_fvu)} steps (above "
                                    f"{MAX_FVU:g}: worse than predicting the mean)")
            dead = float(member.dead(self.config.dead_window).float().mean())
            if dead > MAX_DEAD:
                problems.append(f"{dead:.0%} of its latents dead (not fired in the last {self.config.dead_window} tokens)")
            if problems:
                verdicts[member.name] = " and ".join(problems)
        if self.world.distributed and not self.data_parallel:
            verdicts = {name: why for part in self.world.gather_json(verdicts) for name, why in part.items()}
        return verdicts

    def _off_target(self) -> dict[str, str]:
        """{SAE name: how far off} for each SAE whose L0 over its last steps missed the L0 asked for."""
        landings = {m.name: m.landed() for m in self.mine}
        missed = {name: describe(name, landed) for name, landed in landings.items() if landed and landed["off_target"]}
        if self.world.distributed and not self.data_parallel:
            missed = {name: why for part in self.world.gather_json(missed) for name, why in part.items()}
        return missed

    def _judge(self) -> None:
        """Stop a diverged run before it is exported as a finished SAE (its checkpoint is already saved)."""
        verdicts = self._diverged()
        if not verdicts or self.config.allow_diverged:
            return
        kept = self.out is not None
        raise TrainingError(
            "training diverged, so no SAE was exported: " + "; ".join(f"SAE {n}: {v}" for n, v in verdicts.items())
            + (f"; the run, all its SAEs included, is kept in {self.out / 'checkpoint'}" if kept else "")
            + ". Try a lower learning rate (SAESpec.lr; now "
            + ", ".join(f"{m.spec.learning_rate:.3g}" for m in self.members if m.name in verdicts)
            + "), a longer warm-up (TrainConfig.lr_warmup_steps), a smaller sparsity coefficient (relu/jumprelu) or "
            "more tokens; or set TrainConfig(allow_diverged=True) (--allow-diverged, or train: {allow_diverged: true} in a run file) "
            "and rerun to export these SAEs as they are" + (", from the checkpoint, without training again" if kept else ""))

    # -- checkpoints
    def _save(self) -> None:
        self._share_states()
        if not self.world.main:
            return
        state = {"fingerprint": self.fingerprint(), "step": self.step, "batches_read": self.batches_read,
                 "skipped": self.skipped, "tokens": self.tokens, "members": []}
        tensors = {}
        for i, member in enumerate(self.members):
            saved, member_tensors = member_state(i, member)
            state["members"].append(saved)
            tensors.update(member_tensors)
        save_checkpoint(self.out, state, tensors)

    def _share_states(self) -> None:
        """parallel='saes': every SAE's state (weights, Adam, clocks) from the rank that trains it to all ranks, so
        rank 0 can save them all and every rank exports the same SAEs."""
        if not self.world.distributed or self.data_parallel:
            return
        for i, member in enumerate(self.members):
            owner = i % self.world.size
            saved, tensors = member_state(i, member) if self.world.rank == owner else (None, None)
            saved, tensors = self.world.broadcast_state(saved, tensors, owner)
            if self.world.rank != owner:
                load_member_state(i, member, saved, tensors)

    def _restore(self) -> None:
        found = load_checkpoint(self.out)
        if found is None:
            return
        state, tensors = found
        theirs, ours = _without_old_share(state["fingerprint"]), self.fingerprint()
        if theirs != ours:
            changed = [k for k in ours if theirs.get(k) != ours[k]]
            raise CheckpointError(f"{self.out} holds a checkpoint of another run (differs in: {', '.join(changed)}); "
                                  "use another output folder, or resume=False (--no-resume) to start over there")
        if len(state["members"]) != len(self.members):  # a run of saelab before specs without a hook took them all
            raise CheckpointError(f"{self.out} holds a checkpoint of {len(state['members'])} SAEs, but this run trains "
                                  f"{len(self.members)} ({', '.join(m.name for m in self.members)}); give each SAE "
                                  "its hook to resume it, or resume=False (--no-resume) to start over there")
        for i, (member, saved) in enumerate(zip(self.members, state["members"])):
            load_member_state(i, member, saved, tensors)
        self.step, self.batches_read, self.skipped = state["step"], state["batches_read"], state["skipped"]
        self.tokens = state.get("tokens", self.step * self.config.batch_size)  # older checkpoints: full batches
        self._started = True

    def _export(self, member: Member) -> TrainedSAE:
        export = getattr(member.training, "export", None)
        sae = export() if export is not None else member.sae
        sae.cfg = dataclasses.replace(sae.cfg, training_tokens=self.tokens)
        landed = member.landed()
        if landed is not None and landed["off_target"]:
            warnings.warn(f"saelab: {describe(member.name, landed)}", OffTarget, stacklevel=4)
        return TrainedSAE(member.name, member.hook, sae.fold_input_scale(), self.step, l0=landed)


def _without_old_share(fingerprint: dict) -> dict:
    """A checkpoint's fingerprint without the rank / world_size that runs before distributed training recorded
    (always 0 / 1 there): the data a run reads no longer depends on how many ranks share it."""
    data = fingerprint.get("data", {})
    if data.get("rank") == 0 and data.get("world_size") == 1:
        data = {k: v for k, v in data.items() if k not in ("rank", "world_size")}
    return {**fingerprint, "data": data}


def _check_data_parallel(members: list[Member]) -> None:
    batchwide = [m.name for m in members if not m.sae.per_token]
    if batchwide:
        raise ValueError(f"{', '.join(batchwide)}: BatchTopK-style SAEs pick their latents over the whole batch, which "
                         "data-parallel ranks do not hold; train them with parallel='saes' (--parallel saes), which "
                         "gives each rank whole batches and its own SAEs")


