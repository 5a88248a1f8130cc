"""Autoscaling policies: what a policy sees, Ray Serve's default one, and the rules
every policy's answer goes through.

A policy is a plain function ``policy(ctx: AutoscalingContext) -> (replicas, state)``
(Ray Serve's signature): ``replicas`` may be fractional, ``state`` is a dict handed
back as ``ctx.policy_state`` on the next call. Whatever it returns, as in Ray Serve:

- at zero replicas with requests waiting, the deployment scales up at once (no
  delay, no policy call): to ``ceil(upscaling_factor)`` replicas, at least 1;
- the step from the current count is multiplied by ``upscaling_factor`` or
  ``downscaling_factor`` (a step that this rounds away still moves by one);
- the result is bounded by ``min_replicas`` and ``max_replicas``;
- a higher count is applied only once it has been wanted for ``upscale_delay_s``
  without interruption (and further increases at once while that lasts), a lower one
  after ``downscale_delay_s`` (the 1 -> 0 step after ``downscale_to_zero_delay_s``
  when set), and never below 1 unless the current target is 1. Shoal measures these
  delays in time; Ray counts 100 ms control-loop ticks, which drifts when its
  controller is slow, and restarts the upscale delay after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from shoal._config import DEFAULT_POLICY, AutoscalingConfig
from shoal._errors import ConfigError
from shoal._seam.imports import import_attribute

PolicyFunction = Callable[["AutoscalingContext"], tuple[float, dict[str, Any]]]


@dataclass(frozen=True)
class DeploymentID:
    """A deployment of an application (Ray Serve's ``DeploymentID``)."""

    name: str
    app_name: str


@dataclass
class AutoscalingContext:
    """What an autoscaling policy knows when it decides (Ray Serve's field names).

    Request counts are averages over ``config.look_back_period_s``: ``total_num_requests``
    = queued (waiting in routers) + running (sent to a replica, not yet answered).
    ``aggregated_metrics[name][replica_id]`` is the window's mean of the custom metric
    ``name`` a replica's ``record_autoscaling_stats()`` returns; ``raw_metrics`` holds
    the samples. Times are ``time.time()`` seconds.
    """

    deployment_id: DeploymentID
    deployment_name: str
    app_name: str
    current_num_replicas: int
    target_num_replicas: int
    running_replicas: list[str]
    total_num_requests: float
    total_queued_requests: float
    total_running_requests: float
    requests_per_replica: dict[str, float]
    aggregated_metrics: dict[str, dict[str, float]]
    raw_metrics: dict[str, dict[str, list[float]]]
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]
    last_scale_up_time: float | None
    last_scale_down_time: float | None
    current_time: float
    config: AutoscalingConfig


def replica_queue_length_autoscaling_policy(
    ctx: AutoscalingContext,
) -> tuple[float, dict[str, Any]]:
    """Ray Serve's default policy: as many replicas as keep ``target_ongoing_requests``
    requests (ongoing plus queued) on each one."""
    if ctx.current_num_replicas == 0:
        return (1 if ctx.total_num_requests > 0 else ctx.target_num_replicas), ctx.policy_state
    target = ctx.config.get_target_ongoing_requests()
    return ctx.total_num_requests / target, {}


@dataclass
class Delays:
    """Since when the policy has wanted a higher (or lower) count, without interruption."""

    direction: int = 0  # +1 up, -1 down, 0 neither
    since: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)  # the policy's own, between calls


def cold_start(ctx: AutoscalingContext) -> int | None:
    """The count to scale to at once from zero replicas with requests waiting, else None."""
    if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
        return max(math.ceil(ctx.config.get_upscaling_factor()), 1, ctx.target_num_replicas)
    return None


def scaled(desired: float, ctx: AutoscalingContext) -> int:
    """``desired`` after the scaling factors and the bounds."""
    current = ctx.current_num_replicas
    delta = desired - current
    config = ctx.config
    factor = config.get_upscaling_factor() if delta > 0 else config.get_downscaling_factor()
    count = math.ceil(current + factor * delta)
    if math.ceil(desired) < current and count == current:
        count -= 1  # a small downscaling factor must not stall the step for ever
    return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, count))


def delayed(wanted: int, ctx: AutoscalingContext, delays: Delays, now: float) -> int:
    """The count to apply now: ``wanted`` once wanted long enough, else the current target."""
    current = ctx.target_num_replicas
    config = ctx.config
    direction = (wanted > current) - (wanted < current)
    if direction == 0:
        delays.direction = 0
        return current
    if direction != delays.direction:
        delays.direction, delays.since = direction, now
    if direction > 0:
        delay = config.upscale_delay_s
    elif current == 1 and config.downscale_to_zero_delay_s is not None:
        delay = config.downscale_to_zero_delay_s
    else:
        delay = config.downscale_delay_s
        if current > 1:
            wanted = max(1, wanted)  # only the 1 -> 0 step may reach zero
    if now - delays.since < delay:
        return current
    if direction < 0:
        delays.direction = 0  # each step down waits its own delay again, as in Ray
    # An upscale leaves the streak running: while demand keeps exceeding the target,
    # further steps up follow at once (Ray waits upscale_delay_s again for each step).
    return wanted


def decide(
    policy: PolicyFunction, ctx: AutoscalingContext, delays: Delays, now: float
) -> tuple[int, str]:
    """Run ``policy`` on ``ctx`` under the rules above; the count to apply and why."""
    start = cold_start(ctx)
    if start is not None:
        delays.direction = 0
        return start, cold_start_reason(ctx)
    desired, state = check_answer(policy(ctx))
    return settle(desired, state, ctx, delays, now)


def cold_start_reason(ctx: AutoscalingContext) -> str:
    return f"scale from zero: {ctx.total_num_requests:g} request(s) waiting"


def settle(
    desired: float, state: dict[str, Any], ctx: AutoscalingContext, delays: Delays, now: float
) -> tuple[int, str]:
    """A policy's answer (``desired`` replicas, its ``state``) after the rules: the count
    to apply now and why."""
    delays.state = state
    count = delayed(scaled(desired, ctx), ctx, delays, now)
    return count, (
        f"{ctx.total_num_requests:.3g} ongoing+queued requests on average over "
        f"{ctx.config.look_back_period_s:g} s, for target_ongoing_requests="
        f"{ctx.config.target_ongoing_requests:g} per replica; policy wanted {desired:.3g}"
    )


def check_answer(answer: Any) -> tuple[float, dict[str, Any]]:
    """A policy's ``(replicas, state)``, checked; TypeError saying what was wrong."""
    if (
        isinstance(answer, tuple)
        and len(answer) == 2
        and isinstance(answer[0], int | float)
        and not isinstance(answer[0], bool)
        and isinstance(answer[1], dict | type(None))
        and math.isfinite(answer[0])
        and answer[0] >= 0
    ):
        return float(answer[0]), dict(answer[1] or {})
    raise TypeError(
        "an autoscaling policy must return (replicas, policy_state): a number >= 0 and a "
        f"dict, got {answer!r}"
    )


def capacity_adjusted(replicas: int, target_capacity: float | None) -> int:
    """``replicas`` scaled by ``target_capacity`` percent, as Ray Serve does: rounded half
    up, at least 1 unless ``replicas`` or the capacity is 0; None means 100."""
    if target_capacity is None or target_capacity == 100:
        return replicas
    if target_capacity == 0 or replicas == 0:
        return 0
    scaled = Decimal(replicas) * Decimal(str(target_capacity)) / Decimal(100)
    return max(1, int(scaled.to_integral_value(rounding=ROUND_HALF_UP)))


def load_policy(path: str, option: str = "autoscaling_config.policy.policy_function") -> Any:
    """The policy function at import path ``module:name`` (or ``module.name``).

    Raises ConfigError naming ``option`` and the path when it cannot be imported or is
    not callable.
    """
    if path == DEFAULT_POLICY:
        return replica_queue_length_autoscaling_policy
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(
            f"invalid {option}={path!r}: expected 'module:function' or 'module.function'"
        )
    try:
        target = import_attribute(module_name, attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{option}={path!r} cannot be imported by the "
            f"controller ({exc}); put the function in a module the controller's process "
            "can import"
        ) from None
    if not callable(target):
        raise ConfigError(f"{option}={path!r} is not callable")
    return target
