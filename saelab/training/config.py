"""What to train and how: one TrainConfig for the run, one SAESpec per SAE fed by the shared activation stream."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from saelab.options import Decay, Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Range, check_fields

DEFAULT_K = 32
COMMON_OPTIONS = ("dtype", "d_in", "skip", "cross_layer")
"""SAEConfig fields a spec may set for every architecture, beside its architecture's options (skip: transcoders;
cross_layer: a transcoder on joined hooks, see saelab.activations.joined)."""


@dataclass
class SAESpec:
    """One SAE to train. Several specs share one activation stream (one model forward feeds them all)."""

    arch: str = "topk"
    """Architecture: relu, topk, batchtopk, jumprelu, matryoshka."""
    width: PositiveInt = 4608
    """Number of latents."""
    k: PositiveInt | None = None
    """Active latents per token, for the architectures that take one (topk, batchtopk, matryoshka); None: 32."""
    hook: str | None = None
    """Hook point to read; None: every hook of the activations, one SAE each."""
    target_hook: str | None = None
    """Hook point to reconstruct, read from the same tokens as `hook`: a transcoder (e.g. blocks.5.hook_mlp_out
    from hook blocks.5.ln2.hook_normalized, the MLP's input); None: `hook` itself (an SAE). With options
    {"skip": true}, a skip transcoder."""
    lr: PositiveFloat | None = None
    """Adam learning rate; None: 8e-4 / sqrt(width / 2^14) for every architecture (four times Gao et al.'s fit: with
    the warm-up, the decay and beta2 = 0.99 it trains runs of a few hundred steps markedly better at every k from 16
    to 128, most at large k, docs/quality.md). ReLU and JumpReLU used to get half of it; at the full rate they
    reconstruct markedly better and still land at their target L0 (docs/evals.md, "Recipe or architecture")."""
    options: dict[str, Any] = field(default_factory=dict)
    """The architecture's options (its options class, `sae_class(arch).options_cls`) and dtype, e.g.
    {"target_l0": 64} or {"l1_coefficient": 0.2, "sparsity_warmup_steps": 200}. ReLU and JumpReLU get target_l0=32
    unless their coefficient is given."""

    def __post_init__(self):
        from saelab.sae import SAEConfig, sae_class
        from saelab.options import check_keys, checked

        check_fields(self)
        architecture = sae_class(self.arch)  # an unknown arch is refused, naming the known ones
        if architecture.takes_k:
            self.k = DEFAULT_K if self.k is None else self.k
            if self.k > self.width:
                raise ValueError(f"SAESpec.k must be an integer with 1 <= k <= width={self.width}, got {self.k}")
        elif self.k is not None:
            raise ValueError(f"SAESpec: arch {self.arch!r} takes no k: ask for its L0 with options target_l0 "
                             f"(default {DEFAULT_K}), or fix its {architecture.sparsity_coefficient}; drop k={self.k}")
        where, names = f"SAESpec({self.arch}).options", architecture.options_cls.names()
        check_keys(self.options, [*COMMON_OPTIONS, *names], where)
        common = {key: value for key, value in self.options.items() if key in COMMON_OPTIONS}
        own = {key: value for key, value in self.options.items() if key not in COMMON_OPTIONS}
        self.options = {**checked(SAEConfig, common, where), **checked(architecture.options_cls, own, where)}
        if self.target_hook is not None and self.hook is None:
            raise ValueError(f"SAESpec.target_hook={self.target_hook!r} needs hook, the input it is reconstructed from")
        if self.target_hook == self.hook:
            self.target_hook = None  # an SAE
        if self.options.get("skip") and self.target_hook is None:
            raise ValueError("SAESpec: skip is for transcoders (a target_hook other than hook): an SAE's skip path "
                             "would learn the identity")
        steers = "target_l0" in names
        if steers and not {"target_l0", architecture.sparsity_coefficient} & self.options.keys():
            self.options["target_l0"] = float(DEFAULT_K)  # a fixed coefficient's L0 depends on the data

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 8e-4 / math.sqrt(self.width / 2**14)

    def name(self) -> str:
        """Folder name of this SAE inside the run: arch-width[-k][-target<L0>][-skip][-to-<target hook>]."""
        target = self.options.get("target_l0")
        return (f"{self.arch}-{self.width}" + (f"-k{self.k}" if self.k is not None else "")
                + (f"-target{target:g}" if target is not None else "")
                + ("-skip" if self.options.get("skip") else "")
                + (f"-to-{self.target_hook}" if self.target_hook is not None else ""))

    def identity(self) -> dict:
        """The fields that identify this SAE in a run's fingerprint (an SAE's, without the unset target_hook, is
        the same as before transcoders existed, so its checkpoints still resume)."""
        fields = dataclasses.asdict(self)
        if fields["target_hook"] is None:
            del fields["target_hook"]
        return fields


@dataclass
class TrainConfig:
    """How the run trains. Everything here (with the specs and the data) identifies a run for resuming."""

    tokens: PositiveInt = 2_000_000
    """Training tokens (activation rows) per SAE."""
    batch_size: Annotated[int, Range(at_least=2)] = 4096
    """Tokens per optimiser step (at least 2: the training FVU, which the log shows and the divergence check reads,
    is measured against the batch's own variance)."""
    stream_buffer_tokens: Annotated[int, Range(at_least=4)] = 1 << 16
    """Positions a live model stream shuffles together (its mixing buffer, at least two batches): more mixes
    contexts better, and the run waits for it to fill before the first step. A cache run does not read it."""
    lr_warmup_steps: NonNegativeInt | None = None
    """Linear learning-rate warm-up from 0; None: min(100, steps // 20), so short runs are not a third warm-up."""
    lr_decay_fraction: Fraction = 0.2
    """The learning rate decays linearly to 0 over this final fraction of the steps."""
    adam_betas: tuple[Decay, Decay] = (0.9, 0.99)
    """Adam (beta1, beta2); JumpReLU recipes use beta1 = 0. beta2 = 0.99, not 0.999: a rare huge-norm token (a
    "massive activation") inflates the second moment of every latent it fires, which then barely moves for the next
    ~1000 steps at 0.999; at large k that is a large share of the dictionary (docs/quality.md)."""
    seed: NonNegativeInt = 0
    """Seeds SAE initialisation and the order a cache folder is read in (`saelab train --acts` and
    `train(folder, ...)` alike); a store or stream you build yourself keeps its own seed."""
    normalize_activations: bool = True
    """Scale inputs to unit mean squared norm while training; the factor is folded into the saved weights."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias: geometric_median, mean or zeros, from the first batch."""
    dead_tokens: PositiveInt | None = None
    """A latent is dead after this many tokens without firing; None: min(10M, tokens // 10)."""
    nan_policy: Literal["error", "skip"] = "error"
    """Non-finite activations: 'error' stops and says where; 'skip' skips the batch and counts it."""
    checkpoint_every: PositiveInt = 200
    """Steps between checkpoints (resume continues from the last one)."""
    log_every: PositiveInt = 10
    """Steps between lines of log.jsonl."""
    device: str = "cpu"
    """Where the SAEs train: cpu, cuda, cuda:1, ... (the model, when streaming, runs there too)."""
    kernel: Literal["auto", "triton", "torch", "dense"] = "auto"
    """Sparse kernels for TopK SAEs: auto (Triton on CUDA, PyTorch sparse ops on CPU), triton, torch, or dense."""
    parallel: Literal["data", "saes"] = "data"
    """With several processes (torchrun): 'data' gives each rank an equal slice of every batch and averages the
    gradients (every SAE on every rank; not for batchtopk / matryoshka, whose selection spans the batch); 'saes'
    gives every rank the whole batch and spreads the SAEs over the ranks (SAE i on rank i mod N): no per-step
    communication, any architecture, but it helps only with at least N SAEs. Not part of the run's identity."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project when wandb is installed."""
    allow_diverged: bool = False
    """Export SAEs whose run diverged (mean training FVU above 1 over the last log_every steps, or over 90 % of
    latents dead at the end) instead of stopping with TrainingError; the log marks them either way. Not part of the
    run's identity: rerun a stopped run with it to accept the result from its checkpoint without retraining."""

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas) if isinstance(self.adam_betas, list) else self.adam_betas
        check_fields(self)  # the ranges in the annotations, which run files and flags are checked against too

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.batch_size)

    @property
    def dead_window(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else max(self.batch_size, min(10_000_000, self.tokens // 10))

    @property
    def warmup_steps(self) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else min(100, self.steps // 20)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at `step`: warm-up, flat, then linear decay to 0."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay_steps = int(self.steps * self.lr_decay_fraction)
        decay = min(1.0, (self.steps - step) / decay_steps) if decay_steps else 1.0
        return warm * decay

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data
