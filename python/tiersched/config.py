"""The one configuration place for tiersched's tunables.

Users select tiers with upstream's own flags (`--schedule-policy prefix-aging`, `--load-balance-method score`,
`--eplb-algorithm source_aware`); tunables come from a TOML file named by TIERSCHED_CONFIG, with sections
[request], [engine], [expert], each mapping onto that tier's config dataclass in tiersched.core, and may be
overridden one by one with TIERSCHED_SET="request.aging_rate=2.0,engine.weight_prefix=1". TIERSCHED_TIERS
(comma list of request, engine, expert; default all) limits which tiers the plugin activates.
Every bad value fails at startup with one sentence that says what to do.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

TIER_NAMES = ("request", "engine", "expert")


class ConfigError(ValueError):
    """A tiersched configuration value is invalid; the message says what to do."""


def _tier_config_classes() -> dict[str, type]:
    # Imported lazily: each tier owns its dataclass next to its policy (tiersched.core.*).
    from tiersched.core.engine import EngineTierConfig
    from tiersched.core.expert import PlacementConfig
    from tiersched.core.request import RequestTierConfig

    return {"request": RequestTierConfig, "engine": EngineTierConfig, "expert": PlacementConfig}


@dataclass(frozen=True)
class TierschedConfig:
    tiers: tuple[str, ...] = TIER_NAMES
    sections: Mapping[str, Any] = field(default_factory=dict)  # tier name -> that tier's config dataclass

    def tier(self, name: str):
        return self.sections[name]


def parse_tiers(text: str | None) -> tuple[str, ...]:
    if text is None or not text.strip():
        return TIER_NAMES
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TIER_NAMES]
    if unknown:
        raise ConfigError(
            f"TIERSCHED_TIERS names unknown tier(s) {', '.join(unknown)}; use a comma list of {', '.join(TIER_NAMES)}."
        )
    return names


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def build_section(name: str, values: Mapping[str, Any]):
    cls = _tier_config_classes()[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"[{name}] has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}."
        )
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"[{name}] {exc}") from None
    return instance


def load_config(env: Mapping[str, str] | None = None) -> TierschedConfig:
    env = os.environ if env is None else env
    tiers = parse_tiers(env.get("TIERSCHED_TIERS"))
    raw: dict[str, dict[str, Any]] = {name: {} for name in TIER_NAMES}
    path = env.get("TIERSCHED_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"TIERSCHED_CONFIG points at {path!r}, which does not exist; fix the path or unset it.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"TIERSCHED_CONFIG file {path!r} is not valid TOML ({exc}); fix the file.") from None
        for section, values in data.items():
            if section not in TIER_NAMES or not isinstance(values, dict):
                raise ConfigError(
                    f"TIERSCHED_CONFIG file {path!r} has section [{section}]; only [{'], ['.join(TIER_NAMES)}] are allowed."
                )
            raw[section].update(values)
    overrides = env.get("TIERSCHED_SET", "")
    defaults = {name: cls() for name, cls in _tier_config_classes().items()}
    for item in filter(None, (s.strip() for s in overrides.split(","))):
        key, sep, value = item.partition("=")
        section, dot, attr = key.strip().partition(".")
        if not sep or not dot or section not in TIER_NAMES:
            raise ConfigError(f"TIERSCHED_SET item {item!r} must look like tier.key=value with tier in {', '.join(TIER_NAMES)}.")
        if not hasattr(defaults[section], attr):
            raise ConfigError(f"TIERSCHED_SET item {item!r}: [{section}] has no key {attr!r}.")
        try:
            raw[section][attr] = _coerce(value.strip(), raw[section].get(attr, getattr(defaults[section], attr)))
        except ValueError:
            raise ConfigError(f"TIERSCHED_SET item {item!r}: {value!r} is not a valid value for {section}.{attr}.") from None
    sections = {name: build_section(name, raw[name]) for name in TIER_NAMES}
    return TierschedConfig(tiers=tiers, sections=sections)
