"""Recipes are YAML files of option values; defaults live in a dataclass, the command line wins."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from rpt_common.errors import UserError


def read_yaml(path: str | None) -> dict[str, Any]:
    """The raw mapping of a YAML recipe ({} without a path), or one clear sentence about what is wrong."""
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise UserError(f"recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a mapping of option names to values")
    return data


def load_recipe(path: str | None, section: str | None = None) -> dict[str, Any]:
    """Read a YAML recipe; keys may use '-' or '_'. A `section:` mapping (e.g. `tag:`) is used when present."""
    data = read_yaml(path)
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls, recipe: dict[str, Any], overrides: dict[str, Any], source: str = "recipe"):
    """Dataclass `cls` from its defaults, then `recipe`, then non-None `overrides` (the CLI)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise UserError(f"unknown option(s) in {source}: {', '.join(unknown)} (see --help for the valid names)")
    values = dict(recipe)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(str(e))


def changed_options(saved: dict, now: dict, runtime_only=()) -> list[str]:
    """The option names whose values differ between a run's saved config and the one resuming it, other than
    `runtime_only` ones (which change how, not what, is computed). One rule for tagging and training resumes."""
    return sorted(k for k in set(saved) | set(now) if k not in runtime_only and saved.get(k) != now.get(k))


def differ(names: list[str]) -> str:
    """'a differs' / 'a, b differ'."""
    return f"{', '.join(names)} {'differs' if len(names) == 1 else 'differ'}"
