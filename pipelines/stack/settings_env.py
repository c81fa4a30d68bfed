"""The environment that gives a child process the same :class:`~recsys.config.Settings` as this one.

A managed process (a stream worker) runs the ``recsys`` command, which builds its settings from
the environment; flags (``--dataset``), a YAML file or keyword arguments of the caller are not
there. So every field is written out under the name the settings read first, and a field that is
None removes its variables, so nothing inherited can change what the child sees.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from pydantic import AliasChoices, SecretStr

from recsys.config import Settings


def _names(field: str) -> list[str]:
    """The environment names of ``field``, the one the settings read first in front."""
    alias = Settings.model_fields[field].validation_alias
    names = [c for c in alias.choices if isinstance(c, str) and c.isupper()] if isinstance(alias, AliasChoices) else []
    prefixed = f"RECSYS_{field.upper()}"
    return names + ([prefixed] if prefixed not in names else [])


def _text(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return str(value)


def settings_env(settings: Settings) -> dict[str, str | None]:
    """Variables that rebuild ``settings`` exactly in a child process; None = remove the variable."""
    env: dict[str, str | None] = {"RECSYS_CONFIG": None}  # every field is pinned below: no YAML on top
    for field in Settings.model_fields:
        names, value = _names(field), getattr(settings, field)
        env.update(dict.fromkeys(names))
        if value is not None:
            env[names[0]] = _text(value)
    return env


def child_environment(base: dict[str, str], extra: dict[str, str | None]) -> dict[str, str]:
    """``base`` with ``extra`` applied (a None value removes that variable)."""
    merged = dict(base)
    for key, value in extra.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged
