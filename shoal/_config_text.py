"""YAML and JSON text of a Serve config file: parsing, line numbers, and the legacy
format's message. Apart from :mod:`shoal._deploy_config` so that only reading a file
imports PyYAML (serving ``MODULE:APP`` does not)."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from shoal._errors import ConfigError


def compose(text: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (JSON included), for line numbers; None if unparsable."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def line_of(node: yaml.Node | None, path: str) -> int | None:
    """The 1-based line of ``path`` (``a[0].b``) in the tree: of its key in a mapping, else
    of the deepest part of it that exists (a missing key: its mapping)."""
    line = None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if isinstance(node, yaml.SequenceNode) and part.startswith("["):
            index = int(part[1:-1])
            if index >= len(node.value):
                break
            node = node.value[index]
            line = node.start_mark.line + 1
        elif isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == part), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        else:
            break
    return line


def parse_document(text: str, source: str) -> Any:
    """Parse YAML or JSON text; syntax errors and duplicate keys name the line."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates(source))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}, line {exc.lineno}: invalid JSON: {exc.msg}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{source}{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _no_duplicates(source: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        for key in keys:
            if keys.count(key) > 1:
                raise ConfigError(f"{source}: invalid JSON: duplicate key {key!r}")
        return dict(items)

    return pairs


def legacy_message(data: dict[str, Any], source: str) -> str:
    app = {"name": "default", "route_prefix": data.get("route_prefix", "/")}
    app |= {k: v for k, v in data.items() if k not in ("host", "port", "route_prefix")}
    converted: dict[str, Any] = {}
    if "host" in data or "port" in data:
        converted["http_options"] = {k: data[k] for k in ("host", "port") if k in data}
    converted["applications"] = [app]
    example = yaml.safe_dump(converted, sort_keys=False, default_flow_style=False)
    return (
        f"{source}: this is Ray Serve's single-application config format (import_path at the "
        "top level), which Ray deprecated; shoal reads the multi-application format. Move the "
        "application under 'applications' (host and port under 'http_options'):\n\n"
        + example.rstrip()
    )
