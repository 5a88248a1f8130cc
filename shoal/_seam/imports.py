"""Resolving an import path (``module:function``) to the object it names."""

from __future__ import annotations

import importlib
from typing import Any


def import_attribute(module_name: str, attribute: str) -> Any:
    """``attribute`` of module ``module_name`` (dotted: an attribute of an attribute).

    Raises ImportError or AttributeError as importing or looking up raised them; the
    caller says what the path was for."""
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target
