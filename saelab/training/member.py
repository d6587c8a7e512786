"""One SAE being trained (its optimiser and firing clock), and its part of a checkpoint."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import torch

from saelab.sae import SAE, SAEConfig, estimate_input_scale
from saelab.training.checkpoint import optimizer_tensors, restore_optimizer
from saelab.training.config import SAESpec
from saelab.training.landing import asked_l0, landing


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
    recent_fvu: collections.deque = field(default_factory=collections.deque)
    """Training FVU of the last `log_every` steps: judges at the end whether the run diverged."""
    recent_l0: collections.deque = field(default_factory=collections.deque)
    """Training L0 of the last `log_every` steps: judges at the end whether the SAE landed at the L0 asked for."""

    @property
    def target_hook(self) -> str:
        """The hook this member reconstructs: a transcoder's target, else its own input hook."""
        return self.spec.target_hook if self.spec.target_hook is not None else self.hook

    def landed(self) -> dict | None:
        """Where this SAE's L0 ended against the L0 asked for (saelab.training.landing); None without a target."""
        target = asked_l0(self.sae.cfg)
        if target is None:
            return None
        return landing(target, sum(self.recent_l0) / len(self.recent_l0) if self.recent_l0 else None)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, y: torch.Tensor, normalize: bool, b_dec_init: str) -> None:
        """From the first batch (x at the input hook, y at the target, the same tokens): the input scale (unit mean
        squared norm), a transcoder's target scale, the decoder bias at the (scaled) target's centre, and whatever
        the architecture starts from (Training.start)."""
        def unit_scale(t: torch.Tensor) -> float:
            return estimate_input_scale(t) if normalize else 1.0

        scale = unit_scale(x)
        self.sae.cfg = dataclasses.replace(self.sae.cfg, input_scale=scale)
        if self.sae.cfg.is_transcoder:
            self.sae.cfg = dataclasses.replace(self.sae.cfg, target_scale=unit_scale(y))
        if b_dec_init != "zeros":
            self.sae.init_b_dec_(y * self.sae.cfg.output_scale, method=b_dec_init)
        self.training.start(x * scale)

    def step(self) -> None:
        for param, alias in self.aliases:
            alias.grad = param.grad.T if param.grad is not None else None
        self.optimizer.step()

    def dead(self, window: int) -> torch.Tensor:
        return self.since_fired >= window


def fused_adam(sae: SAE, lr: float, betas: tuple[float, float]):
    """(Adam over the SAE's parameters, its aliases). Fused: one pass over each parameter instead of one per
    operation (5x faster on a 2-core CPU). It copies non-contiguous tensors, so a parameter stored transposed (W_enc,
    latent-major) is stepped through its contiguous transpose: same storage, same update."""
    stepped, aliases = [], []
    for param in sae.parameters():
        if not param.is_contiguous() and param.dim() == 2 and param.T.is_contiguous():
            aliases.append((param, param.detach().T))
            param = aliases[-1][1]
        stepped.append(param)
    return torch.optim.Adam(stepped, lr=lr, betas=betas, fused=True), aliases


def member_state(i: int, member: Member) -> tuple[dict, dict[str, torch.Tensor]]:
    """One SAE's part of a checkpoint: (JSON-able state, tensors named '<i>.<what>')."""
    tensors = {f"{i}.sae.{name}": value for name, value in member.sae.state_dict().items()}
    tensors[f"{i}.since_fired"] = member.since_fired
    opt_tensors, groups = optimizer_tensors(member.optimizer, f"{i}.adam")
    tensors.update(opt_tensors)
    return ({"cfg": member.sae.cfg.to_dict(), "training": member.training.state_dict(), "param_groups": groups,
             "recent_fvu": list(member.recent_fvu), "recent_l0": list(member.recent_l0)}, tensors)


def load_member_state(i: int, member: Member, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    member.sae.cfg = SAEConfig.from_dict(saved["cfg"])
    member.sae.load_state_dict({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{i}.sae.")})
    member.since_fired.copy_(tensors[f"{i}.since_fired"])
    restore_optimizer(member.optimizer, f"{i}.adam", tensors, saved["param_groups"])
    member.training.load_state_dict(saved["training"])
    member.recent_fvu.clear()
    member.recent_fvu.extend(saved.get("recent_fvu", []))
    member.recent_l0.clear()
    member.recent_l0.extend(saved.get("recent_l0", []))
