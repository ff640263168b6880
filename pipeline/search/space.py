"""The search-space language of the tune YAML, turned into Tune domains:

    {loguniform: [lo, hi], zero_prob: p}   log-uniform, plus exact zeros with probability p
    {uniform: [lo, hi]}                    uniform
    {choice: [a, b, ...]}                  one of the values

Every value a space can reach is checked against the pretrain config before anything starts;
`trial_config` is the pretrain config of one trial (base + sampled values).
"""

from __future__ import annotations

import math
from typing import Any

# Tune's sampler base and its wrapper of a seed / numpy RNG (what its own samplers draw from).
from ray.tune.search.sample import Float, LogUniform, _BackwardsCompatibleNumpyRng

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
    validate,
)
from pipeline.data.masks import needs_full_image_output
from pipeline.search.settings import TuneSettings, as_overrides


def _domain(key: str, spec: dict) -> Any:
    """One YAML distribution -> a Tune domain. Forms:
    {loguniform: [lo, hi], zero_prob: p}  (p > 0 adds exact zeros: "lambda_adv including 0"),
    {uniform: [lo, hi]}, {choice: [a, b, ...]}."""
    from ray import tune

    kinds = {"loguniform", "uniform", "choice"} & set(spec)
    extra = set(spec) - {"loguniform", "uniform", "choice", "zero_prob"}
    if len(kinds) != 1 or extra:
        raise ConfigError(f"space.{key}: give exactly one of loguniform/uniform/choice, got {spec}")
    (kind,) = kinds
    arg = spec[kind]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"space.{key}: choice needs a non-empty list, got {arg!r}")
        return tune.choice(arg)
    if not (isinstance(arg, list) and len(arg) == 2 and all(_is_num(v) for v in arg)):
        raise ConfigError(f"space.{key}: {kind} needs [low, high], got {arg!r}")
    lo, hi = float(arg[0]), float(arg[1])
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(f"space.{key}: need 0 < low < high for loguniform, low < high: {arg}")
    if kind == "uniform":
        return tune.uniform(lo, hi)
    p0 = float(spec.get("zero_prob", 0.0))
    if not 0 <= p0 < 1:
        raise ConfigError(f"space.{key}: zero_prob must be in [0, 1), got {p0}")
    if p0 == 0:
        return tune.loguniform(lo, hi)
    domain = Float(lo, hi)
    domain.set_sampler(_ZeroOrLogUniform(p0))
    return domain


class _ZeroOrLogUniform(LogUniform):
    """Exactly 0.0 with probability p0, else log-uniform in [lower, upper]. Draws from the
    search's random_state, as Tune's own samplers do, so a seeded search repeats."""

    def __init__(self, p0: float):
        self.p0 = p0

    def sample(self, domain, config=None, size: int = 1, random_state=None):
        rng = random_state
        if not isinstance(rng, _BackwardsCompatibleNumpyRng):
            rng = _BackwardsCompatibleNumpyRng(rng)
        zero = rng.uniform(0.0, 1.0, size=size) < self.p0
        logs = rng.uniform(math.log(domain.lower), math.log(domain.upper), size=size)
        items = [0.0 if z else float(math.exp(v)) for z, v in zip(zero, logs, strict=True)]
        return items if size > 1 else items[0]

    def __str__(self) -> str:
        return f"ZeroOrLogUniform(p0={self.p0})"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _extremes(spec: dict) -> list[Any]:
    """The values a distribution can reach at its edges, for validating against the config."""
    if "choice" in spec:
        return list(spec["choice"])
    lo, hi = spec.get("loguniform") or spec.get("uniform")
    return [lo, hi] + ([0.0] if spec.get("zero_prob") else [])


def build_space(settings: TuneSettings, base: dict) -> dict[str, Any]:
    """Tune param space from the YAML; every value the space can reach must form a valid
    pretrain config, checked here before anything starts."""
    if not settings.space:
        raise ConfigError("tune: the search space is empty")
    known = set(flatten(to_dict(from_dict(base))))  # every key, defaults included
    space = {}
    for key, spec in settings.space.items():
        if key not in known:
            raise ConfigError(f"space.{key}: not a config key (known: {sorted(known)})")
        space[key] = _domain(key, spec)
        for value in _extremes(spec):
            trial_config(base, {key: value})  # raises ConfigError naming the problem
    return space


def trial_config(base: dict, params: dict[str, Any], **run: Any) -> Config:
    """The pretrain config of one trial: base + sampled params (+ run.* fields)."""
    overrides = as_overrides(params)
    if needs_full_image_output(params.get("mask.kind")):
        # Random masks need the whole image back (docs/method.md); implied, not searched.
        overrides.append("model.full_image_output=true")
    overrides += [f"run.{k}={v}" for k, v in run.items()]
    try:
        return validate(from_dict(apply_overrides(base, overrides)))
    except ConfigError as e:
        raise ConfigError(f"search space gives an invalid config {params}: {e}") from e
