"""Settings of the knowledge-neuron editors (``configs/edit.yaml`` holds the defaults; override with key=value)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Optional

from ..storage.config import check_finite
from ..errors import ConfigError
from ..locating.locate import LocateSettings
from .nullspace import check_null_space


class Choice(str, Enum):
    """A setting with a fixed set of values: OmegaConf rejects any other value by its key, and the value
    compares equal to its plain string (``Rule.paper == "paper"``)."""

    def __str__(self) -> str:
        return self.value


class Rule(Choice):
    signed = "signed"
    paper = "paper"
    unscaled = "unscaled"


class Direction(Choice):
    gradient = "gradient"
    contrast = "contrast"
    new = "new"


class Weighting(Choice):
    activation = "activation"
    sign = "sign"


class BatchSolve(Choice):
    joint = "joint"  # several requests: one least-change problem with every request's prompts as constraints
    sequential = "sequential"  # each request solved in turn on top of the earlier ones


class EraseMode(Choice):
    zero = "zero"
    unk = "unk"


# "raise" is a keyword, so the members are named through the functional API; OmegaConf matches names.
OnFailure = Choice("OnFailure", [("raise", "raise"), ("apply", "apply")])


def as_choice(kind: type[Enum], value, key: str):
    """``value`` (a member or its string) as a member of ``kind``; a ConfigError naming ``key`` otherwise."""
    try:
        return value if isinstance(value, kind) else kind(value)
    except ValueError:
        raise ConfigError(f"{key} must be one of {[m.value for m in kind]}, got {value!r}") from None


@dataclass
class UpdateSettings(LocateSettings):
    rule: Rule = Rule.signed  # signed | paper | unscaled
    force: bool = False  # edit even where the model does not predict old
    # generic-neuron filters (on by default for updates)
    generic_filter: bool = True
    generic_ratio: float = 0.5  # drop a neuron when |a| on generic prompts >= ratio * |a| on the fact's prompts
    generic_quantile: float = 0.75  # ... |a| on generic prompts: this quantile over the prompts
    relation_share: float = 0.1  # with relation neurons given: drop neurons of more than this share of its facts
    # ... and when the neurons left cannot carry the edit (none left, or the margin not reached), edit with
    # the neurons the relation filter dropped too, rather than refuse
    relation_fallback: bool = True
    max_neurons: Optional[int] = None  # keep at most this many (strongest attribution first)
    # paper / unscaled rules
    lambda_old: float = 1.0
    lambda_new: float = 8.0
    unscaled_factor: float = 2.0
    # signed rule
    # gradient: least change along the margin's gradient (default) | contrast: E(new) - E(old) | new: E(new)
    direction: Direction = Direction.gradient
    margin: float = 1.0  # new must lead every other token by this many logits on every edit prompt
    # gradient direction
    solve_steps: int = 12  # at most this many successive least-norm steps
    preserve: bool = True  # least change of the FFN output on generic prompts (False: least Frobenius norm)
    ridge: float = 0.1  # ... plus this share of the plain least-norm penalty (kn_edit.editing.preserve)
    # The change may not exceed this many times the edited value vectors' own norm (Frobenius); on smollm2 the
    # edits that succeed stay below 1, and a margin that saturates would otherwise grow the change without end.
    max_change: float = 2.0
    batch: BatchSolve = BatchSolve.joint  # several requests at once (gradient direction)
    # AlphaEdit-style (kn_edit.editing.nullspace): the change restricted to the null space of the neurons'
    # co-activation over the generic prompts and the prompts of the model's active edits (instead of `preserve`)
    null_space: bool = False
    null_space_threshold: float = 0.01  # eigenvalues below this × the largest span the null space
    # contrast / new directions
    weighting: Weighting = Weighting.activation  # activation (delta ∝ a_i) | sign (delta ∝ sign(a_i))
    initial_scale: float = 1.0
    # Beyond a few hundred the shift wrecks unrelated text (measured on smollm2: scales ~500-1000 multiplied
    # plain-text perplexity by orders of magnitude), so the search stops here.
    max_scale: float = 256.0
    bisect_steps: int = 6
    # When the margin is not reached: raise (model unchanged) or apply the last change tried.
    on_failure: OnFailure = OnFailure["raise"]
    # Text-damage guard (signed rule): refuse the edit (model unchanged) when it changes perplexity on a small
    # fixed Wikipedia sample by more than this share (kn_edit.editing.guard); null: measure and report only.
    max_text_change: Optional[float] = 0.05

    def check(self) -> "UpdateSettings":
        self.check_locate()
        self.rule = as_choice(Rule, self.rule, "rule")
        self.weighting = as_choice(Weighting, self.weighting, "weighting")
        self.direction = as_choice(Direction, self.direction, "direction")
        self.on_failure = as_choice(OnFailure, self.on_failure, "on_failure")
        self.batch = as_choice(BatchSolve, self.batch, "batch")
        if self.direction == "gradient" and self.weighting != "activation":
            raise ConfigError("weighting=sign applies to the contrast and new directions; the gradient direction "
                              "already weighs each neuron by its effect (use weighting=activation)")
        if self.generic_ratio <= 0:
            raise ConfigError(f"generic_ratio must be > 0, got {self.generic_ratio}")
        if not 0.0 <= self.generic_quantile <= 1.0:
            raise ConfigError(f"generic_quantile must be in [0, 1], got {self.generic_quantile}")
        if not 0.0 < self.relation_share <= 1.0:
            raise ConfigError(f"relation_share must be in (0, 1], got {self.relation_share}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ConfigError(f"max_neurons must be >= 1, got {self.max_neurons}")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0 (logits), got {self.margin}")
        if not 0.0 < self.initial_scale <= self.max_scale:
            raise ConfigError(f"need 0 < initial_scale <= max_scale, got {self.initial_scale} and {self.max_scale}")
        if self.solve_steps < 1:
            raise ConfigError(f"solve_steps must be >= 1, got {self.solve_steps}")
        if self.max_change <= 0:
            raise ConfigError(f"max_change must be > 0, got {self.max_change}")
        if self.ridge <= 0:
            raise ConfigError(f"ridge must be > 0 (it keeps the metric invertible), got {self.ridge}")
        if self.bisect_steps < 0:
            raise ConfigError(f"bisect_steps must be >= 0, got {self.bisect_steps}")
        if self.null_space and (self.direction != "gradient" or self.rule != "signed"):
            raise ConfigError("null_space applies to the signed rule's least-change solve (rule=signed, direction=gradient)")
        check_null_space(self)
        check_text_limit(self.max_text_change)
        return self


def check_text_limit(limit, key: str = "max_text_change") -> None:
    """A text-change share setting (``key``): null or a share > 0."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        raise ConfigError(f"{key} must be > 0 (a share, e.g. 0.05) or null, got {limit!r}")


@dataclass
class EraseSettings(LocateSettings):
    mode: EraseMode = EraseMode.zero  # zero | unk: value vectors set to 0, or to E(unknown token)
    force: bool = False
    generic_filter: bool = False  # the paper erases every located neuron
    generic_ratio: float = 0.5
    generic_quantile: float = 0.75
    max_neurons: Optional[int] = None

    def check(self) -> "EraseSettings":
        self.check_locate()
        self.mode = as_choice(EraseMode, self.mode, "mode")
        if self.generic_ratio <= 0:
            raise ConfigError(f"generic_ratio must be > 0, got {self.generic_ratio}")
        if not 0.0 <= self.generic_quantile <= 1.0:
            raise ConfigError(f"generic_quantile must be in [0, 1], got {self.generic_quantile}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ConfigError(f"max_neurons must be >= 1, got {self.max_neurons}")
        return self


@dataclass
class RelationEraseSettings(LocateSettings):
    """Erasing a relation: the neurons located for at least ``relation_share`` of its facts (the paper: 10 %)."""

    mode: EraseMode = EraseMode.zero
    relation_share: float = 0.1

    def check(self) -> "RelationEraseSettings":
        self.check_locate()
        self.mode = as_choice(EraseMode, self.mode, "mode")
        if not 0.0 < self.relation_share <= 1.0:
            raise ConfigError(f"relation_share must be in (0, 1], got {self.relation_share}")
        return self


def with_overrides(settings, overrides: dict):
    """``settings`` with keyword overrides, checked; an unknown key, or a NaN or infinite number
    (:func:`kn_edit.storage.config.check_finite`), is a ConfigError naming it."""
    names = {f.name for f in fields(settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    settings = replace(settings, **overrides)
    check_finite(settings)
    return settings.check()
