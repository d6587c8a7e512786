"""SAEConfig: what every SAE has, plus its architecture's options object; and building an SAE from one.

    SAEConfig(arch="relu", d_in=576, width=4608, options={"l1_coefficient": 0.1})   # or options=ReLUOptions(...)
    create_sae(cfg)

A transcoder is the same config with a target other than its input: it reads hook_name and reconstructs
target_hook (d_out wide), optionally through a linear skip path too:

    SAEConfig(arch="topk", d_in=576, width=4608, k=32, hook_name="blocks.5.ln2.hook_normalized",
              target_hook="blocks.5.hook_mlp_out", d_out=576, skip=True)

A crosscoder is the same config reading several activations at once (`parts`): its input and its reconstruction are
their concatenation, each part multiplied by its own scale (see saelab.crosscoders):

    SAEConfig(arch="batchtopk", d_in=576 + 640, width=8192, k=64, hook_name="smollm2-135m:blocks.12.hook_resid_post+...",
              parts=[{"hook": "blocks.12.hook_resid_post", "model": "smollm2-135m", "d": 576, "scale": 0.031}, ...])

A cross-layer transcoder (CLT) is a transcoder whose input and target are both joined: latents in group g (the width
split into len(parts) equal groups) read input part g only and write target parts g, g+1, ... only, so a latent
read at one layer writes that layer's MLP output and every later one's (see SAE's cross-layer masks):

    SAEConfig(arch="batchtopk", d_in=3 * 576, width=3 * 2048, k=48, hook_name="blocks.3.mlp.hook_in+...",
              target_hook="blocks.3.hook_mlp_out+...", parts=[...], target_parts=[...], cross_layer=True)

On disk (cfg.json, checkpoints) the config is one flat dict, as SAELens's is: `to_dict` merges the options into it
and `from_dict` splits them out again by the architecture's options class.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.files import name_problem
from saelab.options import NonNegativeInt, PositiveFloat, PositiveInt, checked, from_mapping

from .registry import available_architectures, options_class, sae_class

TRANSCODER_KEYS = ("target_hook", "d_out", "skip", "target_scale")
"""SAEConfig fields only a transcoder sets; written to cfg.json only when set (not None, not False)."""
OPTIONAL_KEYS = (*TRANSCODER_KEYS, "parts", "target_parts", "cross_layer")
"""SAEConfig fields written to cfg.json only when set, so an SAE's cfg.json is the same as before they existed."""
PART_KEYS = ("hook", "model", "d", "scale")
"""What a crosscoder records of each activation it reads (see SAEConfig.parts)."""
UNSET = (None, False)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Options:
    """The settings one architecture reads (mostly training knobs), registered with its class. Fields carry the
    Range annotations of saelab.options, so an object built in Python, a run file and a flag are checked alike."""

    def __post_init__(self):
        for name, value in checked(type(self), dataclasses.asdict(self), type(self).__name__).items():
            setattr(self, name, value)  # ints given for floats become floats, tuples lists

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def check_for(self, cfg: "SAEConfig") -> None:
        """Checks that need the rest of the config (its width); nothing by default."""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE (and train it); saved next to the weights as cfg.json."""

    arch: str
    """Architecture name in the registry: relu, topk, batchtopk, jumprelu, matryoshka."""
    d_in: PositiveInt
    """Width of the activations the SAE reads."""
    width: PositiveInt
    """Number of latents."""
    k: PositiveInt | None = None
    """Active latents per token (topk) or on average per token (batchtopk, matryoshka). Kept here rather than in
    the TopK family's options because it names an SAE wherever SAEs are listed (run folders, Hub subfolders, the
    model card) and is a top-level key of SAELens's cfg.json; the architectures without one refuse it in SAESpec."""
    dtype: str = "float32"
    """Parameter dtype: float32 for training; bfloat16/float16 are fine for inference."""

    # -- metadata for the Hub and for users
    model_name: str = ""
    """Language model the activations came from."""
    hook_name: str = ""
    """Hook point the activations came from, e.g. blocks.15.hook_resid_post."""
    input_scale: PositiveFloat = 1.0
    """The SAE was trained on x * input_scale (unit mean squared norm); `fold_input_scale()` removes it."""
    training_tokens: NonNegativeInt = 0
    """Tokens seen during training."""

    # -- transcoders: a target other than the input (all None / False for an SAE, and then absent from cfg.json)
    target_hook: str | None = None
    """Hook point the dictionary reconstructs, e.g. blocks.5.hook_mlp_out read from blocks.5.ln2.hook_normalized;
    None: its own input (an SAE)."""
    d_out: PositiveInt | None = None
    """Width of the target; None: d_in."""
    skip: bool = False
    """Add a linear skip path x @ W_skip [d_in, d_out] to the reconstruction (zero at the start, trained with the
    rest): the latents then explain what a linear map of the input does not. Transcoders only."""
    target_scale: PositiveFloat | None = None
    """The transcoder was trained to reconstruct y * target_scale (unit mean squared norm, like the input);
    None: input_scale (an SAE's target is its input). `fold_input_scale()` removes it too."""

    # -- crosscoders: several activations read (and reconstructed) as one (None for an SAE or a transcoder)
    parts: list[dict[str, Any]] | None = None
    """The activations a crosscoder reads, in order: [{"hook", "model", "d", "scale"}]. Its input (and target) is
    the concatenation of each part's activations times its scale (unit variance per part, so no model or
    layer outweighs another in the loss); the scales are part of what it reads, not folded into its weights."""

    target_parts: list[dict[str, Any]] | None = None
    """The activations a transcoder with a joined input (parts) writes, in order, recorded as parts are: its target
    is their concatenation, each times its scale. None: the target is one activation (or the input, for an SAE)."""
    cross_layer: bool = False
    """A cross-layer transcoder: the width splits into len(parts) equal groups; group g reads input part g alone and
    writes target parts g and later alone (its weights elsewhere are held at zero). Needs len(target_parts) ==
    len(parts): part g of each is one layer's MLP input and output."""

    options: Options | dict[str, Any] = field(default_factory=dict)
    """The architecture's own settings: its options object (`sae_class(arch).options_cls`), or a dict of them; a
    setting the architecture does not read is refused, not ignored."""

    def __post_init__(self):
        self._check_common()
        cls = options_class(self.arch)  # an unknown architecture is refused, naming the known ones
        if isinstance(self.options, dict):
            self.options = from_mapping(cls, self.options, "SAEConfig")
        elif type(self.options) is not cls:
            raise ValueError(f"SAEConfig.options of arch {self.arch!r} must be a {cls.__name__} or a dict of its "
                             f"settings, got {type(self.options).__name__}")
        else:  # a copy: configs made by dataclasses.replace must not share one options object
            self.options = dataclasses.replace(self.options)
        self.options.check_for(self)

    def _check_common(self):
        def fail(name, why):
            raise ValueError(f"SAEConfig.{name} {why}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.arch, str) or not self.arch:
            fail("arch", "must be a non-empty architecture name")
        for name in ("d_in", "width"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.k is not None and (not is_int(self.k) or not 1 <= self.k <= self.width):
            fail("k", f"must be an integer with 1 <= k <= width={self.width}")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {sorted(DTYPES)}")
        if isinstance(self.hook_name, str) and self.hook_name and (problem := name_problem(self.hook_name)):  # it names folders: a run's, the Hub's
            fail("hook_name", f"must be a hook point name; it {problem}")
        v = self.input_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            fail("input_scale", "must be a finite number > 0")
        if not is_int(self.training_tokens) or self.training_tokens < 0:
            fail("training_tokens", "must be an integer >= 0")
        self._check_target(fail, is_int)
        self._check_parts(fail)

    def _check_target(self, fail, is_int) -> None:
        """The transcoder fields; a target equal to the input is stored as None, so an SAE stays an SAE."""
        if self.target_hook is not None:
            if not isinstance(self.target_hook, str):
                fail("target_hook", "must be a hook point name or None")
            if self.target_hook and (problem := name_problem(self.target_hook)):
                fail("target_hook", f"must be a hook point name; it {problem}")
            if self.target_hook in ("", self.hook_name):
                self.target_hook = None
        if self.d_out is not None:
            if not is_int(self.d_out) or self.d_out <= 0:
                fail("d_out", "must be a positive integer or None")
            if self.d_out == self.d_in:
                self.d_out = None
        if not isinstance(self.skip, bool):
            fail("skip", "must be true or false")
        if self.skip and not self.is_transcoder:
            fail("skip", "needs a target other than the input (target_hook or d_out): an SAE's skip path would "
                         "learn the identity and leave the latents nothing to explain")
        v = self.target_scale
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                fail("target_scale", "must be a finite number > 0 or None")
            if not self.is_transcoder:
                fail("target_scale", "is for transcoders only (an SAE's target is its input, scaled by input_scale)")

    def _check_parts(self, fail) -> None:
        """A crosscoder's parts, a joined target's parts and the cross-layer layout: each part a dict of PART_KEYS,
        the parts adding up to the width they are read from (or written to)."""
        if self.parts is not None:
            self.parts = _checked_parts(self.parts, self.d_in, "d_in", lambda why: fail("parts", why))
            if self.is_transcoder and self.target_parts is None:
                fail("parts", "cannot be combined with a transcoder's target unless target_parts lists what it writes "
                              "(a crosscoder reconstructs what it reads)")
        if self.target_parts is not None:
            if self.parts is None or not self.is_transcoder:
                fail("target_parts", "needs a joined input (parts) and a transcoder's target (target_hook)")
            self.target_parts = _checked_parts(self.target_parts, self.output_dim, "d_out",
                                               lambda why: fail("target_parts", why))
        if not isinstance(self.cross_layer, bool):
            fail("cross_layer", "must be true or false")
        if self.cross_layer:
            if self.target_parts is None or len(self.target_parts) != len(self.parts):
                fail("cross_layer", "needs parts and target_parts of the same length (one input and one target per "
                                    "layer)")
            if self.width % len(self.parts):
                fail("cross_layer", f"needs a width that splits into {len(self.parts)} equal groups (one per layer), "
                                    f"got width={self.width}")

    @property
    def is_crosscoder(self) -> bool:
        """Whether the dictionary reads several activations concatenated (see parts)."""
        return self.parts is not None

    @property
    def part_slices(self) -> list[slice]:
        """Where each part sits in the crosscoder's input (and decoder rows)."""
        return _slices(self.parts or [])

    @property
    def target_part_slices(self) -> list[slice]:
        """Where each target part sits in the output (and decoder columns) of a transcoder with target_parts."""
        return _slices(self.target_parts or [])

    @property
    def latent_groups(self) -> list[slice]:
        """A cross-layer transcoder's latents of each layer (group g reads parts[g]); [all latents] otherwise."""
        n = len(self.parts) if self.cross_layer else 1
        size = self.width // n
        return [slice(g * size, (g + 1) * size) for g in range(n)]

    @property
    def is_transcoder(self) -> bool:
        """Whether the dictionary reconstructs something other than its input."""
        return self.target_hook is not None or self.d_out is not None

    @property
    def output_dim(self) -> int:
        """Width of what the dictionary writes: d_out for a transcoder, d_in for an SAE."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def output_hook(self) -> str:
        """Hook point the dictionary reconstructs: target_hook for a transcoder, hook_name for an SAE."""
        return self.target_hook if self.target_hook is not None else self.hook_name

    @property
    def output_scale(self) -> float:
        """The factor the target was multiplied by in training: target_scale, or input_scale for an SAE."""
        return self.target_scale if self.target_scale is not None else self.input_scale

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON-safe dict of cfg.json: the common fields, then the architecture's options. The transcoder
        and crosscoder fields appear only when set, so an SAE's cfg.json is the same as before they existed."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "options" and not (f.name in OPTIONAL_KEYS and getattr(self, f.name) in UNSET)}
        return {**common, **dataclasses.asdict(self.options)}

    @classmethod
    def common_keys(cls) -> list[str]:
        """The fields every SAE's config has (all but its options)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "options"]

    @classmethod
    def accepted_keys(cls) -> list[str]:
        """Every key `from_dict` accepts: the common fields and every architecture's options."""
        options = [name for arch in available_architectures() for name in options_class(arch).names()]
        return cls.common_keys() + sorted(set(options))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """Inverse of to_dict; unknown keys are an error, so a typo never silently becomes a default.

        Keys of another architecture's options are dropped: cfg.json files written before each architecture owned
        its options hold every architecture's settings, and the others never affected this SAE."""
        common = cls.common_keys()
        arch = d.get("arch")
        own = options_class(arch).names() if isinstance(arch, str) and arch in available_architectures() else ()
        unknown = sorted(set(d) - set(cls.accepted_keys()))
        if unknown:
            raise ValueError(f"SAEConfig got unknown keys {unknown}; known keys are {sorted([*common, *own])}")
        return cls(**{k: v for k, v in d.items() if k in common}, options={k: v for k, v in d.items() if k in own})


def _checked_parts(parts, total: int, total_name: str, fail) -> list[dict[str, Any]]:
    """Parts as recorded (PART_KEYS, float scales), after checking them; they must add up to `total`."""
    if not isinstance(parts, (list, tuple)) or len(parts) < 2:
        fail("must list at least two activations (a crosscoder reads several)")
    checked_parts = []
    for part in parts:
        if not isinstance(part, dict) or set(part) != set(PART_KEYS):
            fail(f"must be dicts with exactly the keys {list(PART_KEYS)}")
        d, scale = part["d"], part["scale"]
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            fail("must give each part a positive integer width d")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            fail("must give each part a finite scale > 0")
        if not isinstance(part["hook"], str) or not part["hook"] or not isinstance(part["model"], str):
            fail("must name each part's hook (and its model, '' if unknown)")
        checked_parts.append({key: part[key] for key in PART_KEYS} | {"scale": float(scale)})
    if sum(p["d"] for p in checked_parts) != total:
        fail(f"must add up to {total_name}={total} (the dictionary reads, or writes, their concatenation)")
    return checked_parts


def _slices(parts: list[dict[str, Any]]) -> list[slice]:
    ends = [0]
    for part in parts:
        ends.append(ends[-1] + part["d"])
    return [slice(a, b) for a, b in zip(ends, ends[1:])]


def create_sae(cfg: SAEConfig | dict[str, Any], device: torch.device | str | None = None):
    """A freshly initialised SAE for `cfg` (an SAEConfig or its dict form)."""
    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    return sae_class(cfg.arch)(cfg, device=device)


def create_training(sae):
    """The training objective (and training-only state) that goes with this SAE's architecture."""
    return type(sae).training_cls(sae)
