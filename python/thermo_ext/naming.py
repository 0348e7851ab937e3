"""How errors name a param group and a parameter: every message about a group starts with
:func:`where` and names a parameter with :func:`param_label`."""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["where", "param_label"]


def where(gi: int, group: Dict[str, Any]) -> str:
    """The prefix of every error about group ``gi``: its index and, when it has one, its name."""
    name = group.get("name")
    return f"param group {gi}" + (f" ({name!r})" if name is not None else "") + ": "


def param_label(group: Dict[str, Any], pos: int) -> str:
    """How errors name parameter ``pos`` of a group: its position and, when the group carries
    ``param_names``, its name."""
    names = group.get("param_names")
    return f"parameter {pos}" + (f" ({names[pos]!r})" if names else "")
