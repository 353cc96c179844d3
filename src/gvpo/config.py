"""Configuration: frozen dataclasses, one per concern, loadable from YAML and overridable from the command line.

Every field is documented once, next to its definition (gvpo/config_sections.py). Names follow TRL's GRPOConfig where the idea is the
same (num_generations, beta, learning_rate, max_completion_length, temperature, ...). Field names are unique
across sections, so a command-line override may name the field alone (``beta=0.2``) or with its section
(``algorithm.beta=0.2``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


from gvpo.config_sections import (  # noqa: F401 (re-exported: users build sections from here)
    FRESH_BETA, RATIO_LOSSES, STALE_BETA, AlgorithmConfig, CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, ModelConfig,
    OptimizerConfig, PeftConfig, ReplayConfig, RolloutConfig, TrainingConfig, _fail)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def old_policy_mode(self) -> str:
        """algorithm.old_policy with "auto" resolved (see its comment)."""
        mode = self.algorithm.old_policy
        if mode != "auto":
            return mode
        if self.algorithm.algorithm == "astar_po":
            return "initial"
        if self.algorithm.algorithm == "oapl":
            return "behaviour"  # its anchor is the lagged policy that sampled each group
        demos = bool(self.data.demonstration_column and self.data.demonstrations_per_group)
        return "behaviour" if self.algorithm.algorithm == "gvpo" and self.stale_groups() and not demos else "previous"

    def stale_groups(self) -> bool:
        """Whether the run trains on groups an older policy generated: Ray workers allowed to run ahead, or a
        simulated lag."""
        return (self.rollout.rollout_workers > 0 and self.rollout.max_policy_lag > 0) \
            or self.training.simulated_policy_lag > 0

    def gvpo_beta(self) -> float:
        """algorithm.beta with "auto" (None) resolved: FRESH_BETA, or STALE_BETA on stale groups."""
        if self.algorithm.beta is not None:
            return self.algorithm.beta
        return STALE_BETA if self.stale_groups() else FRESH_BETA

    def __post_init__(self):
        if self.replay.num_historical >= self.rollout.num_generations:
            _fail("num_historical", self.replay.num_historical,
                  f"must be < num_generations ({self.rollout.num_generations}): each group needs a fresh response")
        if self.training.simulated_policy_lag and self.checkpoint.resume:
            _fail("simulated_policy_lag", self.training.simulated_policy_lag,
                  "a checkpoint does not hold the queue of generated batches; resume only with 0")
        d = self.data.demonstrations_per_group if self.data.demonstration_column else 0
        if d and self.algorithm.algorithm == "oapl":
            _fail("demonstrations_per_group", d, "OAPL anchors every response at the policy that sampled it, and a "
                  "demonstration has none; use demonstrations with algorithm=gvpo (or demonstrations_per_group=0)")
        if d and self.algorithm.old_policy == "behaviour":
            _fail("old_policy", self.algorithm.old_policy, "demonstrations have no behaviour log-probs (no sampler); "
                  "use old_policy=previous (default) or initial with demonstration_column")
        if self.replay.num_historical and self.algorithm.algorithm == "oapl":
            _fail("num_historical", self.replay.num_historical, "OAPL's value V is that of the one policy that "
                  "sampled the group; replayed responses come from older ones; use num_historical=0 with "
                  "algorithm=oapl (or algorithm=gvpo, which takes mixed groups)")
        if self.replay.num_historical + d >= self.rollout.num_generations:
            _fail("demonstrations_per_group", d, f"num_historical + demonstrations_per_group must be < num_generations "
                  f"({self.rollout.num_generations}): each group needs a fresh response; lower one of them")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> "Config":
        """A copy with ``{"section.field" or "field": value}`` overrides applied and validated."""
        return from_dict(self.to_dict(), overrides)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_index() -> dict[str, str]:
    """field name -> section name (field names are unique across sections)."""
    return {f.name: sec for sec, cls in _section_classes().items() for f in dataclasses.fields(cls)}


def _coerce(value, hint, name):
    """Convert a YAML / command-line value to the field's annotated type, or say what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value in ("null", "auto"):  # None means auto where a field has an automatic value
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r}: expected a list (YAML list or comma-separated)")
        (inner, *_) = typing.get_args(hint)
        return tuple(_coerce(v, inner, name) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{name}={value!r}: expected true or false")
    if hint in (int, float):
        try:
            out = hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected {hint.__name__}") from None
        if hint is int and isinstance(value, float) and value != out:
            raise ValueError(f"{name}={value!r}: expected an integer")
        return out
    if hint is str:
        return "" if value is None else str(value)
    return value


def from_dict(data: dict | None = None, overrides: dict | None = None) -> Config:
    """Build a validated Config from nested ``{section: {field: value}}`` and flat or dotted overrides."""
    classes = _section_classes()
    index = _field_index()
    values: dict[str, dict] = {sec: {} for sec in classes}
    for sec, fields_ in (data or {}).items():
        if sec not in classes:
            raise ValueError(f"unknown config section {sec!r}{_suggest(sec, classes)}; sections: {', '.join(classes)}")
        if not isinstance(fields_, dict):
            raise ValueError(f"config section {sec!r}: expected a mapping of field: value")
        for key, value in fields_.items():
            _place(values, index, f"{sec}.{key}", value)
    for key, value in (overrides or {}).items():
        _place(values, index, key, value)
    hints = {sec: typing.get_type_hints(cls) for sec, cls in classes.items()}
    built = {}
    for sec, cls in classes.items():
        kwargs = {k: _coerce(v, hints[sec][k], k) for k, v in values[sec].items()}
        built[sec] = cls(**kwargs)
    return Config(**built)


def _place(values, index, key, value):
    sec, _, name = key.rpartition(".")
    if not sec:
        if name not in index:
            raise ValueError(f"unknown config field {name!r}{_suggest(name, index)}")
        sec = index[name]
    elif sec not in values:
        raise ValueError(f"unknown config section {sec!r} in {key!r}{_suggest(sec, values)}")
    elif index.get(name) != sec:
        where = f"; it belongs to section {index[name]!r}" if name in index else _suggest(name, index)
        raise ValueError(f"unknown config field {key!r}{where}")
    values[sec][name] = value


def _suggest(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML file (or the defaults) and apply ``key=value`` overrides (values parsed as YAML)."""
    data = {}
    if path:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e}); fix the file") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections (model:, rollout:, ...)")
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r}: write it as key=value, e.g. beta=0.2 or rollout.temperature=0.8")
            key, raw = item.split("=", 1)
            parsed[key.lstrip("-")] = yaml.safe_load(raw) if raw else ""
        overrides = parsed
    return from_dict(data, overrides)


def save_config(config: Config, path: str | Path) -> None:
    data = config.to_dict()
    for sec in data.values():  # tuples -> lists for plain YAML
        for k, v in sec.items():
            if isinstance(v, tuple):
                sec[k] = list(v)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
