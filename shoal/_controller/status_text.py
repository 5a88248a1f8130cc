"""``print(serve.status())``: the status objects as an indented summary people can read.

Guarantees:

- applications -> deployments, two spaces per level, one line per application and per
  deployment (its status, its replica counts by state, its target and whether it
  autoscales), then, only where there is something to say, the status message (every
  line of it, wrapped), the last scaling decision, and each replica's details
  (``status_details()``, see docs/status-details.md);
- no line is longer than :data:`WIDTH` characters except a single unbreakable word;
  long messages are cut after :data:`MAX_MESSAGE_LINES` lines, saying how many more
  the structured object holds;
- the structured objects are untouched: ``repr()`` and attribute access stay as they
  were (``__str__`` renders, ``__repr__`` is the dataclass's).
"""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal._controller.status import (
        ApplicationStatusOverview,
        DeploymentStatusOverview,
        ServeStatus,
    )

#: The longest line the summary writes (a single unbreakable word may exceed it).
WIDTH = 100
#: Lines of a status message shown; the rest is in the object's ``message``.
MAX_MESSAGE_LINES = 30
_INDENT = "  "
#: Order of replica states in the counts: the healthy one first, then the way to it.
_STATE_ORDER = ("RUNNING", "STARTING", "PENDING", "RECOVERING", "STOPPING")


def render_status(status: ServeStatus) -> str:
    lines: list[str] = []
    if status.proxies:
        lines.append("proxies:")
        for node, proxy in status.proxies.items():
            pid = f" (pid {proxy.pid})" if proxy.pid is not None else ""
            lines.append(f"{_INDENT}{node}: {proxy.status} on {proxy.host}:{proxy.port}{pid}")
    if status.target_capacity is not None:
        lines.append(f"target_capacity: {_number(status.target_capacity)}%")
    if not status.applications:
        lines.append("applications: none")
        return "\n".join(lines)
    lines.append("applications:")
    for name, app in status.applications.items():
        lines.extend(application_lines(name, app, 1))
    return "\n".join(lines)


def render_application(name: str, app: ApplicationStatusOverview) -> str:
    return "\n".join(application_lines(name, app, 0))


def render_deployment(name: str, deployment: DeploymentStatusOverview) -> str:
    return "\n".join(deployment_lines(name, deployment, 0))


def application_lines(name: str, app: ApplicationStatusOverview, level: int) -> list[str]:
    pad = _INDENT * level
    head = [str(app.status)]
    if app.route_prefix is not None:
        head.append(f"route {app.route_prefix}")
    if app.direct_ingress_port is not None:
        head.append(f"direct ingress port {app.direct_ingress_port}")
    if app.last_deployed_time_s:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(app.last_deployed_time_s))
        head.append(f"deployed {stamp}")
    lines = [f"{pad}{name}: {', '.join(head)}"]
    lines.extend(_message_lines(app.message, level + 1))
    for d_name, deployment in app.deployments.items():
        lines.extend(deployment_lines(d_name, deployment, level + 1))
    return lines


def deployment_lines(name: str, deployment: DeploymentStatusOverview, level: int) -> list[str]:
    pad = _INDENT * level
    counts = _counts(deployment.replica_states)
    scaling = "autoscaling, target" if deployment.autoscaling else "target"
    lines = [f"{pad}{name}: {deployment.status}, {counts} ({scaling} {deployment.target_replicas})"]
    lines.extend(_message_lines(deployment.message, level + 1))
    if deployment.scaling_decisions:
        last = deployment.scaling_decisions[-1]
        stamp = time.strftime("%H:%M:%S", time.localtime(last.time))
        text = f"last scaling: {stamp} {last.from_replicas} -> {last.to_replicas}: {last.reason}"
        lines.extend(_wrapped(text, level + 1))
    details = deployment.details
    if details:
        lines.append(f"{pad}{_INDENT}details:")
        for replica_id, values in details.items():
            lines.extend(value_lines(replica_id, values, level + 2))
    return lines


def _counts(states: Mapping[str, int]) -> str:
    ordered = [s for s in _STATE_ORDER if states.get(s)] + sorted(
        s for s in states if s not in _STATE_ORDER and states[s]
    )
    if not ordered:
        return "no replicas"
    return ", ".join(f"{states[s]} {s}" for s in ordered)


def _message_lines(message: str, level: int) -> list[str]:
    if not message:
        return []
    source = message.splitlines()
    shown = source[:MAX_MESSAGE_LINES]
    pad = _INDENT * (level + 1)
    lines = [f"{_INDENT * level}message:"]
    for line in shown:
        lines.extend(textwrap.wrap(line, WIDTH, initial_indent=pad, subsequent_indent=pad) or [pad])
    if len(source) > len(shown):
        lines.append(f"{pad}... {len(source) - len(shown)} more lines (see its .message)")
    return [line.rstrip() for line in lines]


def _wrapped(text: str, level: int) -> list[str]:
    pad = _INDENT * level
    return textwrap.wrap(text, WIDTH, initial_indent=pad, subsequent_indent=pad + _INDENT)


def value_lines(key: str, value: Any, level: int) -> list[str]:
    """``key: value`` as YAML-like lines: mappings nest, short ones stay on one line."""
    pad = _INDENT * level
    if isinstance(value, Mapping) and value:
        inline = f"{pad}{key}: {_inline(value)}"
        if len(inline) <= WIDTH and not any(isinstance(v, Mapping) and v for v in value.values()):
            return [inline]
        lines = [f"{pad}{key}:"]
        for sub_key, sub_value in value.items():
            lines.extend(value_lines(str(sub_key), sub_value, level + 1))
        return lines
    return _wrapped(f"{key}: {_inline(value)}", level)


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, float):
        return _number(value)
    if value is None:
        return "null"
    return str(value)


def _number(value: float) -> str:
    """A float as people read it: 4 significant digits, no trailing ``.0`` for integers."""
    if not math.isfinite(value) or value != int(value):
        return f"{value:.4g}"
    return str(int(value))
