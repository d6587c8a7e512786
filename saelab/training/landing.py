"""Whether a trained SAE landed at the sparsity it was asked for: its final L0 against its target.

ReLU and JumpReLU are steered to cfg.target_l0; TopK keeps k latents per token, BatchTopK and Matryoshka k on average.
Any of them can still end elsewhere: a run too short for the steering to settle, or held-out text that excites the
latents more or less than the training text. Such an SAE is saved as it is, but reported as off target in the
training log, its metrics.json (`l0_target`) and train's last message.
"""
from __future__ import annotations

from saelab.sae import SAEConfig

L0_TOLERANCE = 0.25
"""An SAE whose final L0 (in its last training steps, or on held-out text) is more than this share above or below
the L0 asked for is off target."""


class OffTarget(UserWarning):
    """An SAE was trained and saved, but its final L0 missed the L0 it was asked for by more than L0_TOLERANCE."""


def asked_l0(cfg: SAEConfig) -> float | None:
    """The L0 an SAE was asked for: target_l0, else k; None for a fixed sparsity coefficient (no target)."""
    target = getattr(cfg.options, "target_l0", None)  # the architectures steered to an L0 have one
    if target is not None:
        return float(target)
    return float(cfg.k) if cfg.k is not None else None


def landing(target: float, training: float | None, held_out: float | None = None) -> dict:
    """Where an SAE landed, as metrics.json's `l0_target` holds it: the target, the L0 of its last training steps and
    on held-out text (None where not measured), the tolerance, and whether either L0 is off target."""
    measured = [l0 for l0 in (training, held_out) if l0 is not None]
    return {"target": target, "training": training, "held_out": held_out, "tolerance": L0_TOLERANCE,
            "off_target": any(abs(l0 / target - 1) > L0_TOLERANCE for l0 in measured)}


def describe(name: str, landed: dict) -> str:
    """One line for an off-target SAE: how far it landed from its target, and what would bring it closer."""
    measured = [f"{landed[key]:.3g} {where}" for key, where in
                (("training", "over its last training steps"), ("held_out", "on held-out text"))
                if landed[key] is not None]
    if _off(landed, "training"):
        advice = ("training on more tokens (--tokens, TrainConfig.tokens) gives the steering time to settle; log.jsonl "
                  "shows L0 step by step")
    else:
        advice = "the held-out text fires its latents more or less than the training text did"
    return (f"SAE {name} is off target: L0 {' and '.join(measured)}, asked for {landed['target']:g} (more than "
            f"{landed['tolerance']:.0%} off); it is saved as it is, and {advice}")


def _off(landed: dict, key: str) -> bool:
    l0 = landed.get(key)
    return l0 is not None and abs(l0 / landed["target"] - 1) > landed["tolerance"]
