"""Importing what the command line names: ``module:attribute``, with builder arguments.

The import itself is :func:`shoal._instance.build.load_target`, the one a config
file's ``import_path`` goes through; here its errors become one message with the
command's name and no traceback.
"""

from __future__ import annotations

from typing import Any


def parse_args(command: str, pairs: list[str]) -> dict[str, str]:
    """``key=value`` words as a dict (Ray's ``serve run`` builder arguments, as strings)."""
    args: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise SystemExit(
                f"{command}: expected builder arguments as key=value, got {pair!r}; "
                "e.g. shoal run module:builder model=small"
            )
        args[key] = value
    return args


def load(target: str, command: str = "shoal run", args: dict[str, Any] | None = None) -> Any:
    """The application at ``module:attribute``; a builder function is called with ``args``.

    Exits with ``{command}: message`` naming what to fix if it cannot be built.
    """
    from shoal._errors import ConfigError
    from shoal._instance.build import load_target

    try:
        return load_target(target, args)
    except ConfigError as exc:
        raise SystemExit(f"{command}: {exc}") from None
