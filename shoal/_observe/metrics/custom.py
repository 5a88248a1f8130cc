"""Users' custom metrics: ``Counter``, ``Gauge`` and ``Histogram`` as ``ray.serve.metrics``.

Behaviour as Ray Serve's (its errors are ValueError/TypeError with Ray's texts,
followed by what to do):

- created in a replica, a metric gets the tag keys ``deployment``, ``replica`` and
  ``application`` with the replica's values as default tags (the replica ids of
  ``serve.status()``); declaring one of them yourself is refused ("reserved");
- ``tags`` given to ``inc/set/observe`` override the default tags; every declared tag
  key needs a value (from either), and an undeclared key is refused;
- a declared ``route`` tag key left without a value gets the request's route (shoal's
  request context has none: it is "" until it does; pass it explicitly);
- exported with Ray's ``ray_`` prefix: ``Counter("my_counter")`` is
  ``ray_my_counter_total`` on /metrics, as Ray exports it;
- recording is thread-safe (sync methods run on threads) and costs ~1 us.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from shoal._errors import ConfigError, ConfigTypeError
from shoal._observe import metrics

DEPLOYMENT_TAG = "deployment"
REPLICA_TAG = "replica"
APPLICATION_TAG = "application"
ROUTE_TAG = "route"
_RESERVED = (DEPLOYMENT_TAG, REPLICA_TAG, APPLICATION_TAG)
#: Ray exports every metric of ``ray.util.metrics`` under this prefix.
PREFIX = "ray_"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _no_replica() -> tuple[str, str, str] | None:
    return None


#: (application, deployment, replica id) of the replica running the caller, or None
#: outside a replica; set by ``shoal._api.context`` (which knows replicas).
_identity: Callable[[], tuple[str, str, str] | None] = _no_replica


def set_identity_provider(provider: Callable[[], tuple[str, str, str] | None]) -> None:
    global _identity
    _identity = provider


class _Metric:
    kind = "counter"

    def __init__(
        self,
        name: str,
        description: str = "",
        tag_keys: tuple[str, ...] | None = None,
        _buckets: Sequence[float] = (),
    ) -> None:
        if not name:
            raise ConfigError("Empty name is not allowed. Please provide a metric name.")
        if not _NAME.match(name):
            raise ConfigError(
                f"metric name {name!r} is not a Prometheus name: use letters, digits and "
                "underscores, not starting with a digit"
            )
        if tag_keys and not isinstance(tag_keys, tuple):
            raise ConfigTypeError(f"tag_keys should be a tuple type, got: {type(tag_keys)}")
        keys = tuple(tag_keys or ())
        for key in keys:
            if not isinstance(key, str):
                raise ConfigTypeError(f"Tag keys must be str, got {type(key)}.")
        self._name, self._description, self._user_keys = name, description, keys
        identity = _identity()
        self._serve_tags: dict[str, str] = {}
        if identity is not None:
            _refuse_reserved(keys)
            app, deployment, replica = identity
            self._serve_tags = {DEPLOYMENT_TAG: deployment, REPLICA_TAG: replica}
            if app:
                self._serve_tags[APPLICATION_TAG] = app
        self._tag_keys: tuple[str, ...] = (*self._serve_tags, *keys)
        self._default_tags: dict[str, str] = dict(self._serve_tags)
        self._lock = threading.Lock()
        self._family = self._define(PREFIX + name, description, self._tag_keys, _buckets)

    def _define(
        self, name: str, help_text: str, keys: tuple[str, ...], buckets: Sequence[float]
    ) -> Any:
        return metrics.counter(name, help_text, keys)

    def set_default_tags(self, default_tags: dict[str, str]) -> _Metric:
        """Tags used when a record call does not give them; returns the metric itself."""
        if self._serve_tags:
            _refuse_reserved(tuple(default_tags))
        for key, value in default_tags.items():
            if key not in self._tag_keys:
                raise ConfigError(f"Unrecognized tag key {key}. Declare it in tag_keys.")
            if not isinstance(value, str):
                raise ConfigTypeError(f"Tag values must be str, got {type(value)}.")
        self._default_tags = {**default_tags, **self._serve_tags}
        return self

    @property
    def info(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "description": self._description,
            "tag_keys": self._tag_keys,
            "default_tags": self._default_tags,
        }

    def _child(self, tags: dict[str, str] | None) -> Any:
        """The child for the final tags (default tags overridden by ``tags``)."""
        if tags:
            for value in tags.values():
                if not isinstance(value, str):
                    raise ConfigTypeError(f"Tag values must be str, got {type(value)}.")
            unknown = [key for key in tags if key not in self._tag_keys]
            if unknown:
                raise ConfigError(
                    f"Unrecognized tag keys: {unknown}. Declare them in tag_keys "
                    f"(declared: {list(self._tag_keys)})."
                )
        values = []
        for key in self._tag_keys:
            if tags and key in tags:
                values.append(tags[key])
            elif key in self._default_tags:
                values.append(self._default_tags[key])
            elif key == ROUTE_TAG:
                values.append("")
            else:
                raise ConfigError(
                    f"Missing value for tag key {key}. Pass it in tags or set_default_tags()."
                )
        return self._family.labels(*values)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._name, self._description, self._user_keys or None))


def _refuse_reserved(keys: tuple[str, ...]) -> None:
    for key in _RESERVED:
        if key in keys:
            raise ConfigError(f"'{key}' tag is reserved for Ray Serve metrics")


def _number(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigTypeError(f"value must be int or float, got {type(value)}.")
    return float(value)


class Counter(_Metric):
    """A cumulative metric that only goes up (Prometheus' counter)."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        """Add ``value`` (> 0, default 1) for these tags (default tags otherwise)."""
        amount = _number(value)
        if amount <= 0:
            raise ConfigError(f"value must be >0, got {value}")
        child = self._child(tags)
        with self._lock:
            child.inc(amount)


class Gauge(_Metric):
    """A value that goes up and down: the last one set is exported."""

    def _define(
        self, name: str, help_text: str, keys: tuple[str, ...], buckets: Sequence[float]
    ) -> Any:
        return metrics.gauge(name, help_text, keys)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        """Set the gauge to ``value`` for these tags."""
        number = _number(value)
        child = self._child(tags)
        with self._lock:
            child.set(number)


class Histogram(_Metric):
    """Counts observations in buckets bounded by ``boundaries`` (their upper bounds)."""

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        if not boundaries:
            raise ConfigError(
                "boundaries argument should be provided when using the Histogram class. "
                'e.g., Histogram("name", boundaries=[1.0, 2.0])'
            )
        for index, boundary in enumerate(boundaries):
            if boundary <= 0:
                raise ConfigError(
                    f"Invalid `boundaries` argument at index {index}, {boundaries}. Use "
                    "positive values for the arguments."
                )
        self.boundaries = list(boundaries)
        super().__init__(name, description, tag_keys, sorted(boundaries))

    def _define(
        self, name: str, help_text: str, keys: tuple[str, ...], buckets: Sequence[float]
    ) -> Any:
        return metrics.histogram(name, help_text, keys, buckets)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        """Count ``value`` in its bucket for these tags."""
        number = _number(value)
        child = self._child(tags)
        with self._lock:
            child.observe(number)

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "boundaries": self.boundaries}

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            Histogram,
            (self._name, self._description, self.boundaries, self._user_keys or None),
        )
