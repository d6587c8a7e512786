"""Shared pieces of every SAE: the option families, the inference base class, the training base class, AuxK.

Conventions (all architectures):
    pre    = (x - b_dec) @ W_enc + b_enc        W_enc [d_in, width], b_enc [width]
    codes  = activation(pre)                    dense [..., width]; the architecture decides the activation
    x_hat  = codes @ W_dec + b_dec              W_dec [width, d_in] (unit-norm rows), b_dec [d_in]
    mse    = mean over tokens of ||x - x_hat||^2 (summed over d_in, so it is comparable to FVU when the
             activations are normalised to unit mean squared norm)

A transcoder (cfg.target_hook / cfg.d_out, see SAEConfig) reads x and reconstructs another activation y:
    pre    = x @ W_enc + b_enc                  no centring: b_dec lives in y's space, not x's; a centre of x would
                                                only shift b_enc (by -centre @ W_enc), so nothing replaces it
    y_hat  = codes @ W_dec + b_dec [+ x @ W_skip]   W_dec [width, d_out], b_dec [d_out], W_skip [d_in, d_out]
    mse    = mean over tokens of ||y - y_hat||^2

A cross-layer transcoder (cfg.cross_layer) is a transcoder on joined parts whose weights are masked, not separate:
    W_enc block-diagonal        group g of the latents reads input part g only
    W_dec block upper-triangular group g writes target parts g, g+1, ... only
The masked blocks are zeros held at zero (at init, in the gradient before each step, in the weights after it), and
each decoder row is unit-norm over the blocks it may write. Dense: every latent stores d_in + d_out weights and
uses d_in / n + (n - g) d_out / n of them, and a training step multiplies by all of them.

The inference module (`SAE`) holds only weights. Everything that exists only while training (coefficient
warm-up, the BatchTopK running threshold, dead-latent masks) lives in a `Training` object that wraps it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.kernels.api import sparse_decode
from saelab.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from .config import DTYPES, Options, SAEConfig



@dataclass
class SteeredOptions(Options):
    """Settings of the architectures with a sparsity penalty whose weight can be steered to a target L0 (ReLU,
    JumpReLU): see SparsityCoefficient."""

    sparsity_warmup_steps: NonNegativeInt = 0
    """ReLU/JumpReLU: the sparsity coefficient ramps linearly from 0 over this many steps."""
    target_l0: PositiveFloat | None = None
    """ReLU/JumpReLU: the L0 the sparsity coefficient is steered to while training (the coefficient is then only
    its starting value). SAESpec sets 32 unless the coefficient is given; None keeps the coefficient fixed."""

    def check_for(self, cfg: SAEConfig) -> None:
        if self.target_l0 is not None and not self.target_l0 <= cfg.width:
            raise ValueError(f"SAEConfig.target_l0 must be a number in (0, width={cfg.width}] or None, "
                             f"got {self.target_l0!r}")


@dataclass
class AuxKOptions(Options):
    """Settings of the TopK family's AuxK dead-latent loss (see auxk_loss)."""

    auxk_coefficient: NonNegativeFloat = 1 / 32
    """TopK family: weight of the AuxK dead-latent loss."""
    k_aux: PositiveInt | None = None
    """TopK family: latents used by AuxK; None means d_in // 2."""


@dataclass
class TrainOutput:
    """What one training forward returns. Only `loss` carries a graph; the rest are detached, for logging."""

    loss: Tensor
    mse: Tensor
    aux_loss: Tensor
    sparsity_loss: Tensor
    l0: Tensor
    """Mean number of active latents per token."""
    fired: Tensor
    """[width] bool: latents active on at least one token of this batch (for dead-latent tracking)."""
    x_hat: Tensor
    prefix_mse: Tensor | None = None
    """Matryoshka only: [n_groups] reconstruction MSE of each nested prefix."""
    extras: dict[str, Tensor] = field(default_factory=dict)


def residual_point(hook: str) -> str:
    """A hook's name, with `blocks.L.hook_resid_pre` written as `blocks.(L-1).hook_resid_post`: between two blocks
    the residual stream is one activation under two names (SAELens SAEs often name the first)."""
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) > 0 and \
            parts[2] == "hook_resid_pre":
        return f"blocks.{int(parts[1]) - 1}.hook_resid_post"
    return hook


class SAE(nn.Module):
    """Inference SAE: weights plus encode/decode. Subclasses define `activation(pre)`.

    save / load / from_pretrained / push_to_hub are attached by saelab.hub (loaded with saelab itself), so that the
    hub imports this package and never the other way round."""

    arch: ClassVar[str] = ""  # set by @register
    training_cls: ClassVar[type["Training"]]  # set at the bottom of each architecture file
    takes_k: ClassVar[bool] = False
    """Whether the architecture reads cfg.k (active latents per token); the CLI and SAESpec ask this."""
    options_cls: ClassVar[type[Options]] = Options  # set by @register
    """The dataclass of the settings this architecture reads (cfg.options); setting any other one is refused."""
    per_token: ClassVar[bool] = True
    """Whether a token's codes depend on that token alone (BatchTopK's depend on the whole batch)."""
    sparsity_coefficient: ClassVar[str | None] = None
    """The option weighting this architecture's sparsity penalty (ReLU, JumpReLU), if it has one."""
    saelens_name: ClassVar[str | None] = None
    """The architecture's name in SAELens's cfg.json ('architecture'); None: SAELens has no equivalent."""
    saelens_activation: ClassVar[str] = "relu"
    """The activation_fn SAELens releases before 6.0 read."""

    @classmethod
    def saelens_keys(cls, cfg: SAEConfig) -> dict[str, Any]:
        """The keys of its SAELens cfg.json that only this architecture has (the export writes the shared ones)."""
        return {"k": cfg.k} if cls.takes_k and cfg.k is not None else {}

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        if self.arch and cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} is arch {self.arch!r} but cfg.arch is {cfg.arch!r}")
        self.cfg = cfg
        kw = dict(device=device, dtype=cfg.torch_dtype)
        # [d_in, width] as the transpose of a latent-major [width, d_in] buffer: the sparse kernels' W_enc gradient
        # is built latent by latent, so it lands in the parameter's own layout with no transposing copy.
        self.W_enc = nn.Parameter(torch.empty(cfg.width, cfg.d_in, **kw).T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.width, cfg.output_dim, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.output_dim, **kw))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.output_dim, **kw))
        self._init_weights()

    def _init_weights(self):
        """Random unit-norm decoder rows; encoder = decoder transpose, so every latent starts as a matched filter.
        A transcoder's encoder and decoder live in different spaces: each gets its own random unit-norm rows."""
        with torch.no_grad():
            w = torch.randn(self.cfg.width, self.cfg.d_in, device=self.W_dec.device, dtype=torch.float32)
            w /= w.norm(dim=1, keepdim=True)
            self.W_enc.copy_(w.T)
            if self.cfg.is_transcoder:
                w = torch.randn(self.cfg.width, self.cfg.output_dim, device=self.W_dec.device, dtype=torch.float32)
                w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            if self.cfg.cross_layer:  # each latent a unit-norm filter of its own layer's input
                self.mask_cross_layer_()
                self.W_enc.div_(self.W_enc.norm(dim=0, keepdim=True).clamp_min(1e-8))
                self.normalize_decoder_()

    def cross_layer_blocks(self) -> list[tuple[str, slice, slice]]:
        """(parameter, rows, columns) of every block a cross-layer transcoder holds at zero: the encoder's inputs
        outside a group's own part, the decoder's (and skip path's) targets of earlier layers. Empty otherwise."""
        if not self.cfg.cross_layer:
            return []
        blocks = []
        inputs, targets = self.cfg.part_slices, self.cfg.target_part_slices
        for group, (latents, part, target) in enumerate(zip(self.cfg.latent_groups, inputs, targets)):
            blocks += [("W_enc", slice(0, part.start), latents), ("W_enc", slice(part.stop, None), latents),
                       ("W_dec", latents, slice(0, target.start))]
            if self.cfg.skip:
                blocks.append(("W_skip", part, slice(0, target.start)))
        return blocks

    @torch.no_grad()
    def mask_cross_layer_(self, grads: bool = False) -> None:
        """Zero a cross-layer transcoder's masked blocks in its weights (grads=True: in their gradients, so that
        Adam's moments of them stay zero too). Nothing for any other dictionary."""
        for name, rows, columns in self.cross_layer_blocks():
            tensor = getattr(self, name).grad if grads else getattr(self, name)
            if tensor is not None:
                tensor[rows, columns] = 0

    # -- inference
    def _check_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            where = f" (hook {self.cfg.hook_name})" if self.cfg.hook_name else ""
            raise ValueError(f"SAE expects d_in={self.cfg.d_in}{where} but got input with last dim {x.shape[-1]}")
        return x.to(self.W_enc.dtype)

    def _check_target(self, y: Tensor) -> Tensor:
        if y.shape[-1] != self.cfg.output_dim:
            where = f" (hook {self.cfg.output_hook})" if self.cfg.output_hook else ""
            raise ValueError(f"the dictionary reconstructs d_out={self.cfg.output_dim}{where} but got a target with "
                             f"last dim {y.shape[-1]}")
        return y.to(self.W_dec.dtype)

    @property
    def encoder_center(self) -> Tensor | None:
        """What the encoder subtracts from its input: an SAE's b_dec, nothing for a transcoder (see the module)."""
        return None if self.cfg.is_transcoder else self.b_dec

    def add_skip(self, y_hat: Tensor, x: Tensor) -> Tensor:
        """y_hat plus the skip path x @ W_skip, when the dictionary has one."""
        return y_hat + x.to(self.W_skip.dtype) @ self.W_skip if self.cfg.skip else y_hat

    def check_hook(self, hook: str | None) -> None:
        """Refuse to be read at a hook other than the one this SAE was trained on (cfg.hook_name; an SAE that names
        none is taken at its word): its latents mean nothing there, and a result would carry the other hook's name.
        Every analysis handed a model, a hook and an SAE asks this before it reads anything."""
        trained = self.cfg.hook_name
        if trained and hook and residual_point(trained) != residual_point(hook):
            raise ValueError(f"the SAE was trained on {trained}, not {hook}: its latents mean nothing at another hook; "
                             f"read it at {trained}, or use an SAE trained on {hook}")

    def pre_acts(self, x: Tensor) -> Tensor:
        x = self._check_input(x)
        center = self.encoder_center
        return (x if center is None else x - center) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """Pre-activations -> dense codes; what makes each architecture itself (defined by every subclass)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its activation")

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., width]."""
        return self.activation(self.pre_acts(x))

    def decode(self, codes: Tensor) -> Tensor:
        """codes @ W_dec + b_dec; a skip transcoder's skip path needs the input too: see forward."""
        if codes.shape[-1] != self.cfg.width:
            raise ValueError(f"SAE has width={self.cfg.width} but got codes with last dim {codes.shape[-1]}")
        return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_topk(self, indices: Tensor, values: Tensor) -> Tensor:
        """Decode sparse codes given as (indices, values) [..., k] without building a dense [..., width] matrix."""
        # on the CPU, embedding_bag refuses an out-of-range index itself: the kernels' separate check is skipped there
        return sparse_decode(indices, values.to(self.W_dec.dtype), self.W_dec,
                             check_indices=indices.device.type != "cpu") + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x (an SAE) or of the target read with x (a transcoder)."""
        return self.add_skip(self.decode(self.encode(x)), x)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        out = f", d_out={self.cfg.output_dim}{', skip' if self.cfg.skip else ''}" if self.cfg.is_transcoder else ""
        return f"arch={self.cfg.arch}, d_in={self.cfg.d_in}{out}, width={self.cfg.width}{k}, dtype={self.cfg.dtype}"

    # -- weight surgery
    def fold_input_scale(self) -> "SAE":
        """A copy that reads raw activations: trained on s*x, it returns codes(s*x)/s and x_hat(s*x)/s.

        Every activation here is positively homogeneous once biases (and thresholds) are divided by s,
        so W_enc and W_dec stay as trained (decoder rows keep unit norm) and codes come out in raw units.
        A transcoder trained to map s*x to t*y returns codes(s*x)/t and y_hat(s*x)/t: W_enc and W_skip are
        multiplied by s/t and the biases (and thresholds) divided by t, so its codes are in the target's raw units.
        """
        s, t = self.cfg.input_scale, self.cfg.output_scale
        folded = copy.deepcopy(self)
        folded.cfg = dataclasses.replace(self.cfg, input_scale=1.0, target_scale=None)
        with torch.no_grad():
            if s != t:
                folded.W_enc.mul_(s / t)
                if self.cfg.skip:
                    folded.W_skip.mul_(s / t)
            folded.b_enc.div_(t)
            folded.b_dec.div_(t)
        return folded

    def penalty_norms(self) -> Tensor:
        """Each latent's decoder norm as a sparsity penalty weighs its activation: the row's norm, or a crosscoder's
        sum of its parts' norms (a latent pays for every activation it writes to; Anthropic's crosscoder loss)."""
        w = wide(self.W_dec)
        if not self.cfg.is_crosscoder:
            return w.norm(dim=1)
        written = self.cfg.target_part_slices if self.cfg.target_parts else self.cfg.part_slices
        return sum(w[:, part].norm(dim=1) for part in written)

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-8):
        """Rescale W_dec rows to unit norm (call after each optimiser step); a cross-layer transcoder's masked blocks
        are zeroed first, so a row is unit-norm over the layers it writes."""
        self.mask_cross_layer_()
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_parallel_grad_(self, eps: float = 1e-8):
        """Project out of W_dec.grad the component along each row (call before each optimiser step),
        so that the step changes directions, not norms, which normalize_decoder_ would undo anyway."""
        self.mask_cross_layer_(grads=True)
        if self.W_dec.grad is None:
            return
        w = wide(self.W_dec)
        g = wide(self.W_dec.grad)
        # g -= <g, w> / |w|^2 * w, row by row, in three passes over [width, d] and no temporaries of that size
        along = torch.einsum("nd,nd->n", g, w) / w.norm(dim=1).square().clamp_min(eps**2)
        g.addcmul_(w, along.unsqueeze(1), value=-1)
        if g is not self.W_dec.grad:
            self.W_dec.grad.copy_(g)

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor, method: str = "geometric_median"):
        """Start b_dec at the centre of a sample of (scaled) activations [N, d_in]: geometric median or mean. A
        transcoder's b_dec starts at the centre of its (scaled) targets [N, d_out]."""
        check = self._check_target if self.cfg.is_transcoder else self._check_input
        sample = wide(check(sample).reshape(-1, self.cfg.output_dim))
        if method == "geometric_median":
            centre = geometric_median(sample)
        elif method == "mean":
            centre = sample.mean(0)
        else:
            raise ValueError(f"init_b_dec_ method must be 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(centre)


@torch.no_grad()
def estimate_input_scale(sample: Tensor) -> float:
    """The cfg.input_scale that gives activations unit mean squared norm: 1 / sqrt(mean ||x||^2)."""
    ms = wide(sample.reshape(-1, sample.shape[-1])).pow(2).sum(-1).mean()
    if not ms > 0:
        raise ValueError("cannot estimate input_scale: the sample is empty or all zeros")
    return float(ms.rsqrt())


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld iterations: the point minimising the sum of Euclidean distances; robust to outlier tokens."""
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        w = 1 / dist
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


def warmup(coefficient: float, step: int, steps: int) -> float:
    """Linear warm-up from 0 (step 0) to `coefficient` (step >= steps)."""
    return coefficient if steps <= 0 else coefficient * min(1.0, step / steps)


ADAPT_RATE = 0.02
"""How fast a sparsity coefficient follows its target L0: log-coefficient change per step per unit log(L0/target)."""


def log_l0_error(l0: float, target: float) -> float:
    """log(L0 / target), with L0 = 0 (a dead start) read as 1 % of the target."""
    return math.log(max(l0, 0.01 * target) / target)


def steered(coefficient: float, l0: float, target: float, rate: float | None = None) -> float:
    """The sparsity coefficient after one step of steering L0 towards `target`.

    Multiplicative (integral control on log L0 / target), so it needs no knowledge of the loss's scale and works the
    same for an L1 and an L0 penalty; each step changes the coefficient by at most 5 %, so one odd batch (or a dead
    start, L0 = 0) cannot throw it far.
    """
    error = log_l0_error(l0, target)
    return coefficient * math.exp(min(0.05, max(-0.05, (ADAPT_RATE if rate is None else rate) * error)))


MIN_PENALTY_SHARE = 0.01
"""The smallest share of the loss a steered sparsity term is lowered to (see SparsityCoefficient.observe)."""


class SparsityCoefficient:
    """The penalty weight of a ReLU/JumpReLU training: fixed (with the recipe's linear warm-up), or, when
    target_l0 is set (SteeredOptions), steered each step after the warm-up towards that L0 (kept in the checkpoint); `rate` is
    the steering's ADAPT_RATE, unless the architecture needs another."""

    def __init__(self, start: float, target: float | None, warmup_steps: int, rate: float = ADAPT_RATE):
        self.value, self.target, self.warmup_steps, self.rate = start, target, warmup_steps, rate

    def at(self, step: int) -> float:
        return warmup(self.value, step, self.warmup_steps)

    def observe(self, step: int, l0: Tensor | float, mse: Tensor | float, penalty: Tensor | float,
                across=None) -> float | None:
        """After a step that measured `l0`, its reconstruction loss `mse` and the unweighted `penalty` (L1 or L0);
        across (Training.across_ranks) turns a rank's share of a batch into the batch's value. Returns the batch's
        log(L0 / target) when the coefficient was steered, else None (no target, warm-up, or a torch.no_grad() pass).

        L0 can fall below the target for reasons the coefficient does not control (early on, reconstruction alone
        switches random latents off); the coefficient then stops falling where its term is 1 % of the reconstruction loss, as
        lowering it further has no effect and would only delay its return (integral wind-up).
        """
        # steer in training passes only (not under torch.no_grad()); reading the tensors syncs a GPU, so only then
        if self.target is not None and step >= self.warmup_steps and torch.is_grad_enabled():
            if across is not None:  # every rank steers by the whole batch, so their coefficients stay equal
                device = next((v.device for v in (l0, mse, penalty) if isinstance(v, Tensor)), None)
                l0, mse, penalty = across(torch.tensor([float(l0), float(mse), float(penalty)],
                                                       dtype=torch.float64, device=device)).tolist()
            floor = MIN_PENALTY_SHARE * float(mse) / max(float(penalty), 1e-12)
            self.value = max(steered(self.value, float(l0), self.target, self.rate), min(self.value, floor))
            return log_l0_error(float(l0), self.target)
        return None

    def logged(self) -> dict[str, Tensor]:
        """The target beside the L0 in every log line, so a run shows how close it got."""
        return {"target_l0": torch.tensor(float(self.target))} if self.target is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"coefficient": self.value} if self.target is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state.get("coefficient", self.value))


def auxk_loss(W_dec: Tensor, pre: Tensor, residual: Tensor, dead: Tensor | None, k_aux: int,
              coefficient: float) -> Tensor:
    """AuxK (Gao et al. 2024): the top-k_aux dead latents try to reconstruct what the live ones missed.

    loss = coefficient * min(1, n_dead / k_aux) * ||e - e_hat||^2 / ||e - mean(e)||^2 (sums over the batch),
    with e = x - x_hat detached (AuxK should revive dead latents, not move the main reconstruction) and
    e_hat decoded from the dead latents without b_dec. Zero when nothing is dead.
    """
    zero = wide(pre.new_zeros(()))
    if dead is None or coefficient == 0:
        return zero
    if dead.shape != pre.shape[-1:]:
        raise ValueError(f"dead mask must have shape [width]=[{pre.shape[-1]}], got {list(dead.shape)}")
    dead = dead.to(device=pre.device, dtype=torch.bool)
    n_dead = int(dead.sum())
    if n_dead == 0 or pre.shape[0] == 0:
        return zero
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
    return auxk_ratio(sparse_decode(idx, vals.relu(), W_dec, check_indices=False), residual, n_dead, k_aux,
                      coefficient)  # top-k positions: always in range


def auxk_ratio(e_hat: Tensor, residual: Tensor, n_dead: int, k_aux: int, coefficient: float,
               across=None) -> Tensor:
    """AuxK's loss from the dead latents' reconstruction e_hat of the (detached) residual: see auxk_loss.

    across (Training.across_ranks, data-parallel training): the residual's mean and variance are the whole batch's,
    so the mean over ranks of this loss is the one-process loss of the batch.
    """
    e = wide(residual.detach())
    e_hat = wide(e_hat)
    if across is None:
        total_variance = (e - e.mean(0)).square_().sum().clamp_min(1e-12)
    else:  # each rank's sum around the batch mean, averaged: the batch's total variance / world size
        total_variance = across((e - across(e.mean(0))).square_().sum()).clamp_min(1e-12)
    return coefficient * min(1.0, n_dead / k_aux) * F.mse_loss(e_hat, e, reduction="sum") / total_variance


class Training:
    """The training objective of one SAE and its training-only state. The trainer, each step:

        out = training.loss(x, step=step, dead=dead_mask, target=y)   # x * cfg.input_scale, y * cfg.output_scale
        out.loss.backward()
        sae.remove_parallel_grad_(); optimizer.step(); sae.normalize_decoder_()
        firing_counts += out.fired
    """

    kernel: str = "auto"  # saelab.kernels backend, for architectures with a sparse path (TopK)
    across_ranks = None
    """Set by the trainer in data-parallel training: averages a tensor over the ranks' equal shares of the batch,
    for the few batch-wide statistics a loss needs (AuxK's residual variance, the steered coefficient's L0)."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self._buffers: dict[str, Tensor] = {}  # [N, width] step buffers kept across steps (sparse_codes.reused)

    @property
    def cfg(self) -> SAEConfig:
        """The SAE's current config: the trainer replaces it (input_scale) after the training object is made, and
        an export that read a stale copy would save weights in training units under input_scale=1."""
        return self.sae.cfg

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None, target: Tensor | None = None) -> TrainOutput:
        """The architecture's training objective on a batch (defined by every subclass): reconstruct `target`
        (a transcoder's, from the same tokens as x, already multiplied by cfg.output_scale) or x itself."""
        raise NotImplementedError(f"{type(self).__name__} does not define its training loss")

    def _flat(self, x: Tensor) -> Tensor:
        return self.sae._check_input(x).reshape(-1, self.cfg.d_in)

    def _flat_pair(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(x [N, d_in], target [N, d_out]); the target is x itself unless given (a transcoder must give it)."""
        x = self._flat(x)
        if target is None:
            if self.cfg.is_transcoder:
                raise ValueError(f"a transcoder's loss needs its target (the activations at "
                                 f"{self.cfg.output_hook or 'its target hook'}, of the same tokens as x)")
            return x, x
        target = self.sae._check_target(target).reshape(-1, self.cfg.output_dim)
        if len(target) != len(x):
            raise ValueError(f"the target must hold the same tokens as the input: {len(target)} rows against {len(x)}")
        return x, target

    def start(self, x: Tensor) -> None:
        """Initialise from the first batch x (already in training units), after b_dec; most need nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Training-only state to checkpoint next to the weights (empty for most architectures)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]):
        """Restore what state_dict returned (nothing, unless the architecture keeps training state)."""


def wide(t: Tensor) -> Tensor:
    """Accumulate losses in at least float32 (bf16 parameters would lose the loss otherwise)."""
    return t if t.dtype == torch.float64 else t.float()


def mse_of(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over d_in, averaged over tokens (one fused kernel, forward and backward)."""
    dtype = torch.promote_types(wide(x).dtype, wide(x_hat).dtype)
    return F.mse_loss(x_hat.to(dtype), x.to(dtype), reduction="sum") / max(1, x.shape[:-1].numel())


def summarise(codes: Tensor) -> tuple[Tensor, Tensor]:
    """(l0, fired) of dense codes [N, width]."""
    active = codes.detach() != 0
    return active.sum(-1).float().mean(), active.any(0)
