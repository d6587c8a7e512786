"""Train several SAEs from one activation stream: each batch (one model forward, or one read of the cache) feeds
every SAE, whatever its hook, width, k or architecture.

A step, for each SAE: scale the inputs, compute the architecture's loss (AuxK sees the latents dead for
`dead_window` tokens), step Adam with the decoder's parallel gradient removed, renormalise the decoder rows.
Checkpoints hold everything a step depends on, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from saelab.activations import ActivationBatch, ActivationStore, ModelStream
from saelab.errors import HookError, TrainingError
from saelab.sae import SAE, SAEConfig, create_sae, create_training, estimate_input_scale
from saelab.training.checkpoint import (CheckpointError, load_checkpoint, optimizer_tensors, restore_optimizer,
                                     save_checkpoint)
from saelab.training.config import SAESpec, TrainConfig

LOG = "log.jsonl"


@dataclass
class Member:
    """One SAE being trained, with its optimiser and the tokens since each latent last fired."""

    name: str
    hook: str
    spec: SAESpec
    sae: SAE
    training: object
    optimizer: torch.optim.Optimizer
    since_fired: torch.Tensor
    aliases: list[tuple[torch.Tensor, torch.Tensor]]
    """(parameter, the contiguous alias Adam steps instead), for parameters stored transposed (W_enc)."""

    def step(self) -> None:
        for param, alias in self.aliases:
            alias.grad = param.grad.T if param.grad is not None else None
        self.optimizer.step()

    def dead(self, window: int) -> torch.Tensor:
        return self.since_fired >= window


@dataclass
class TrainedSAE:
    """A finished SAE for inference (input scale folded in), with where it came from and how it did."""

    name: str
    hook: str
    sae: SAE
    steps: int
    metrics: object | None = None  # saelab.eval.EvalResult, when evaluated
    folder: Path | None = None  # where it was saved


class Trainer:
    def __init__(self, source, specs: list[SAESpec | dict], config: TrainConfig | None = None, *,
                 out: str | Path | None = None, resume: bool = True, progress: bool = True):
        self.config = config or TrainConfig()
        self.source = _as_source(source, self.config.batch_size)
        if getattr(self.source, "batch_size", self.config.batch_size) != self.config.batch_size:
            raise ValueError(f"the activation source gives batches of {self.source.batch_size} but "
                             f"TrainConfig.batch_size is {self.config.batch_size}")
        self.specs = [s if isinstance(s, SAESpec) else SAESpec(**s) for s in specs]
        if not self.specs:
            raise ValueError("give at least one SAE to train")
        self.out = Path(out) if out is not None else None
        self.resume, self.progress = resume, progress
        self.members = [self._member(spec) for spec in self.specs]
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"two SAEs would share a name: {names}; give them different widths, k's or hooks")
        self.step = 0
        self.batches_read = 0
        self.skipped = 0
        self._started = False

    def _member(self, spec: SAESpec) -> Member:
        hooks = list(self.source.hooks)
        hook = spec.hook or hooks[0]
        if hook not in hooks:
            raise HookError(f"SAE {spec.name()} reads hook {hook!r}, but the activations hold {', '.join(hooks)}")
        options = dict(spec.options)
        d_in = options.pop("d_in", self.source.d[hook])
        if d_in != self.source.d[hook]:
            raise ValueError(f"SAE {spec.name()} expects d_in={d_in} but hook {hook} gives {self.source.d[hook]}")
        cfg = SAEConfig(arch=spec.arch, d_in=d_in, width=spec.width, k=spec.k, hook_name=hook,
                        model_name=_model_name(self.source), **options)
        name = f"{hook}/{spec.name()}"  # also the SAE's folder in the run: one folder per hook, as on the Hub
        with torch.random.fork_rng(devices=[]):  # each SAE's init depends on the seed and its name, not on order
            torch.manual_seed(self.config.seed + zlib.crc32(name.encode()))
            sae = create_sae(cfg, device=self.config.device)
        # fused Adam: one pass over each parameter instead of one per operation (5x faster on a 2-core CPU). It
        # copies non-contiguous tensors, so a parameter stored transposed (W_enc, latent-major) is stepped through
        # its contiguous transpose: same storage, same update.
        stepped, aliases = [], []
        for param in sae.parameters():
            if not param.is_contiguous() and param.dim() == 2 and param.T.is_contiguous():
                aliases.append((param, param.detach().T))
                param = aliases[-1][1]
            stepped.append(param)
        optimizer = torch.optim.Adam(stepped, lr=spec.learning_rate, betas=self.config.adam_betas, fused=True)
        since = torch.zeros(spec.width, dtype=torch.long, device=self.config.device)
        training = create_training(sae)
        training.kernel = self.config.kernel
        return Member(name, hook, spec, sae, training, optimizer, since, aliases)

    # -- the run
    def fingerprint(self) -> dict:
        return {"config": self.config.to_dict(), "specs": [dataclasses.asdict(s) for s in self.specs],
                "data": _describe(self.source)}

    def fit(self) -> list[TrainedSAE]:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume:
                self._restore()
        logger = _Logger(self.out, self.step, self.config.wandb_project, self.fingerprint())
        bar = tqdm(total=self.config.steps, initial=self.step, desc="training", unit="step", disable=not self.progress)
        for batch in self._batches():
            if self.step >= self.config.steps:
                break
            self.batches_read += 1
            if not self._finite(batch):
                continue
            outputs = self.train_on(batch)
            bar.update()
            if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                record = self._record(outputs)
                logger.write(record)
                bar.set_postfix_str(_postfix(record))
            if self.out is not None and (self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps):
                self._save()
        bar.close()
        logger.close()
        if self.step < self.config.steps:
            raise TrainingError(f"the activations ran out after {self.step} of {self.config.steps} steps")
        return [self._export(member) for member in self.members]

    def train_on(self, batch: ActivationBatch) -> list:
        """One optimiser step of every SAE on `batch` (the first batch also sets input scales and decoder biases)."""
        if not self._started:
            self._initialise(batch)
        outputs = [self._train_step(member, batch.acts[member.hook]) for member in self.members]
        self.step += 1
        return outputs

    def _batches(self) -> Iterator[ActivationBatch]:
        """The run's batch sequence from batch number `batches_read` on, across epochs for a cache."""
        if isinstance(self.source, ActivationStore):
            epoch, start = 0, self.batches_read
            while True:
                per_epoch = self.source.batches_per_epoch(epoch)
                if per_epoch == 0:
                    raise TrainingError(f"the cache holds fewer tokens than one batch ({self.config.batch_size})")
                if start < per_epoch:
                    yield from self.source.iter_batches(epoch=epoch, start=start)
                    start = 0
                else:
                    start -= per_epoch
                epoch += 1
        else:  # a live stream cannot seek: replay it (deterministic for its seed) up to where the run stopped
            batches = iter(self.source)
            for _ in range(self.batches_read):
                next(batches, None)
            yield from batches

    def _finite(self, batch: ActivationBatch) -> bool:
        for hook in {m.hook for m in self.members}:
            bad = (~torch.isfinite(batch.acts[hook])).any(dim=1)
            if bad.any():
                where = f"{int(bad.sum())} of {len(bad)} tokens at {hook} in batch {self.batches_read - 1} (step {self.step})"
                if self.config.nan_policy == "error":
                    raise TrainingError(f"non-finite activations: {where}; pass nan_policy='skip' to skip such batches")
                self.skipped += 1
                return False
        return True

    @torch.no_grad()
    def _initialise(self, batch: ActivationBatch) -> None:
        """From the first batch: the input scale (unit mean squared norm) and the decoder bias of each SAE."""
        for member in self.members:
            x = batch.acts[member.hook].to(self.config.device, torch.float32)
            scale = estimate_input_scale(x) if self.config.normalize_activations else 1.0
            member.sae.cfg = dataclasses.replace(member.sae.cfg, input_scale=scale)
            if self.config.b_dec_init != "zeros":
                member.sae.init_b_dec_(x * scale, method=self.config.b_dec_init)
        self._started = True

    def _train_step(self, member: Member, acts: torch.Tensor):
        x = acts.to(self.config.device, torch.float32) * member.sae.cfg.input_scale
        for group in member.optimizer.param_groups:
            group["lr"] = member.spec.learning_rate * self.config.lr_factor(self.step)
        out = member.training.loss(x, step=self.step, dead=member.dead(self.config.dead_window))
        if not torch.isfinite(out.loss):
            raise TrainingError(f"SAE {member.name}: the loss became {out.loss.item()} at step {self.step}; "
                                "lower the learning rate")
        member.sae.zero_grad(set_to_none=True)
        out.loss.backward()
        member.sae.remove_parallel_grad_()
        member.step()
        member.sae.normalize_decoder_()
        member.since_fired += len(x)
        member.since_fired[out.fired] = 0
        variance = (x - x.mean(0)).square_().sum(-1).mean()
        return out, float(out.mse / variance)

    def _record(self, outputs) -> dict:
        record = {"step": self.step, "tokens": self.step * self.config.batch_size,
                  "lr_factor": round(self.config.lr_factor(self.step - 1), 6), "skipped_batches": self.skipped}
        for member, (out, fvu) in zip(self.members, outputs):
            record[member.name] = {"loss": float(out.loss.detach()), "mse": float(out.mse), "fvu": fvu, "l0": float(out.l0),
                                   "aux": float(out.aux_loss),
                                   "dead": float(member.dead(self.config.dead_window).float().mean())}
        return record

    # -- checkpoints
    def _save(self) -> None:
        state = {"fingerprint": self.fingerprint(), "step": self.step, "batches_read": self.batches_read,
                 "skipped": self.skipped, "members": []}
        tensors = {}
        for i, member in enumerate(self.members):
            for name, value in member.sae.state_dict().items():
                tensors[f"{i}.sae.{name}"] = value
            tensors[f"{i}.since_fired"] = member.since_fired
            opt_tensors, groups = optimizer_tensors(member.optimizer, f"{i}.adam")
            tensors.update(opt_tensors)
            state["members"].append({"cfg": member.sae.cfg.to_dict(), "training": member.training.state_dict(),
                                     "param_groups": groups})
        save_checkpoint(self.out, state, tensors)

    def _restore(self) -> None:
        found = load_checkpoint(self.out)
        if found is None:
            return
        state, tensors = found
        if state["fingerprint"] != self.fingerprint():
            theirs, ours = state["fingerprint"], self.fingerprint()
            changed = [k for k in ours if theirs.get(k) != ours[k]]
            raise CheckpointError(f"{self.out} holds a checkpoint of another run (differs in: {', '.join(changed)}); "
                                  "use another output folder, or resume=False (--no-resume) to start over there")
        for i, (member, saved) in enumerate(zip(self.members, state["members"])):
            member.sae.cfg = SAEConfig.from_dict(saved["cfg"])
            member.sae.load_state_dict({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{i}.sae.")})
            member.since_fired.copy_(tensors[f"{i}.since_fired"])
            restore_optimizer(member.optimizer, f"{i}.adam", tensors, saved["param_groups"])
            member.training.load_state_dict(saved["training"])
        self.step, self.batches_read, self.skipped = state["step"], state["batches_read"], state["skipped"]
        self._started = True

    def _export(self, member: Member) -> TrainedSAE:
        export = getattr(member.training, "export", None)
        sae = export() if export is not None else member.sae
        sae.cfg = dataclasses.replace(sae.cfg, training_tokens=self.step * self.config.batch_size)
        return TrainedSAE(member.name, member.hook, sae.fold_input_scale(), self.step)


class _Logger:
    """log.jsonl (truncated to the resumed step, so a resumed run's log reads as one run) and optional W&B."""

    def __init__(self, out: Path | None, step: int, wandb_project: str | None, config: dict):
        self.file = None
        if out is not None:
            path = out / LOG
            kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                    if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("saelab: wandb is not installed; logging to log.jsonl only")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            flat = {f"{k}/{m}": v for k, sub in record.items() if isinstance(sub, dict) for m, v in sub.items()}
            self.wandb.log({**{k: v for k, v in record.items() if not isinstance(v, dict)}, **flat}, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _postfix(record: dict) -> str:
    parts = []
    for name, values in record.items():
        if isinstance(values, dict):
            parts.append(f"{name.split('/')[-1]} fvu={values['fvu']:.3f} L0={values['l0']:.1f} "
                         f"dead={values['dead']:.0%}")
    return " | ".join(parts)


def _as_source(source, batch_size: int):
    """A cache folder, an ActivationStore, a ModelStream, or any iterable of ActivationBatches that says its
    `hooks`, their widths `d` and its `batch_size` (e.g. activations already in memory)."""
    if isinstance(source, (str, Path)):
        return ActivationStore(source, batch_size=batch_size)
    if all(hasattr(source, name) for name in ("__iter__", "hooks", "d", "batch_size")):
        return source
    raise TypeError(f"train from an activation cache folder, an ActivationStore, a ModelStream or an iterable of "
                    f"ActivationBatches with .hooks, .d and .batch_size; not {type(source).__name__}")


def _model_name(source) -> str:
    if isinstance(source, ActivationStore):
        return source.manifest.run["model"]
    return source.model.name if isinstance(source, ModelStream) else getattr(source, "model_name", "")


def _describe(source) -> dict:
    if isinstance(source, ActivationStore):
        return {"cache": source.manifest.run, "tokens": source.n_tokens, "hooks": source.hooks, "seed": source.seed,
                "shuffle": source.shuffle, "shards_per_window": source.shards_per_window,
                "rank": source.rank, "world_size": source.world_size}
    if isinstance(source, ModelStream):
        return {"model": source.model.name, "hooks": source.hooks, "text": source.text.fingerprint(),
                "seed": source.seed, "buffer_tokens": source.buffer_tokens, "rank": source.rank,
                "world_size": source.world_size}
    return {"source": type(source).__name__, "hooks": list(source.hooks)}


def train(source, saes: list[SAESpec | dict], config: TrainConfig | None = None, *, out: str | Path | None = None,
          resume: bool = True, progress: bool = True, model=None, eval_text=None,
          eval_tokens: int = 4096) -> list[TrainedSAE]:
    """Train every SAE in `saes` on one activation stream.

    out: checkpoint there (and resume from it), then save each SAE to out/<hook>/<arch>-<width>[-k<k>]/.
    model + eval_text: evaluate each SAE at the end on that held-out text (reconstruction, sparsity, spliced CE/KL);
    the metrics go into the SAE's folder as metrics.json.
    """
    trained = Trainer(source, saes, config, out=out, resume=resume, progress=progress).fit()
    for result in trained:
        if model is not None and eval_text is not None:
            from saelab.eval import evaluate

            result.metrics = evaluate(result.sae, model=model, text=eval_text, tokens=eval_tokens)
        if out is not None:
            from saelab.hub import save_sae

            result.folder = save_sae(result.sae, Path(out) / result.name, metrics=result.metrics)
    return trained
