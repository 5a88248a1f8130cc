"""Selector: send each request to one member, chosen by the input, a header, or by weight."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from shoal._api.deployment import deployment
from shoal._errors import ConfigError
from shoal.patterns._common import (
    KeyFunction,
    Members,
    PatternBase,
    RoutedResult,
    call_user,
    check_keys,
    check_weights,
    current_request_id,
    deployment_name,
    named_members,
    pick_weighted,
    replica_id,
    sticky_key,
    unit_hash,
)
from shoal.patterns._errors import SelectionError


@deployment(max_ongoing_requests=100)
class Selector(PatternBase):
    """Route each request to exactly one member. The first rule that names a member wins:

    1. ``choose(*args, **kwargs)`` (sync or async) returns a member name, or None;
    2. ``header``: over HTTP, the value of that request header is a member name;
    3. ``weights`` (A/B split): a member drawn by weight; with ``sticky_key``
       (a field of a dict input, or a function of the input) the draw is a hash
       of ``(salt, key)``, so a key always gets the same member, in every
       replica and after restarts, for as long as the weights stay the same;
    4. ``default``.

    A name that is not a member, or no name at all, raises :class:`SelectionError`
    (HTTP 400). ``user_config`` keys (applied live by ``reconfigure``):
    ``weights``, ``default``. ``salt`` defaults to the deployment's name.
    """

    def __init__(
        self,
        members: Members,
        *,
        choose: Callable[..., Any] | None = None,
        header: str | None = None,
        weights: Mapping[str, float] | None = None,
        sticky_key: KeyFunction = None,
        default: str | None = None,
        salt: str | None = None,
    ) -> None:
        self.name = deployment_name("Selector")
        self.what = f"Selector '{self.name}'"
        self.members = named_members(members, self.what)
        if choose is None and header is None and weights is None and default is None:
            raise ConfigError(f"{self.what}: give at least one of choose, header, weights, default")
        self.choose = choose
        self.header = header.lower() if header else None
        self.sticky_key = sticky_key
        self.salt = self.name if salt is None else salt
        self.weights: dict[str, float] | None = None
        self.default: str | None = None
        self._configure(weights=weights, default=default)
        self.counts = dict.fromkeys(self.members, 0)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        check_keys(config, {"weights", "default"}, self.what)
        self._configure(**config)

    def _configure(self, **options: Any) -> None:
        if options.get("weights") is not None:
            self.weights = check_weights(options["weights"], list(self.members), self.what)
        if options.get("default") is not None:
            if options["default"] not in self.members:
                raise ConfigError(
                    f"{self.what}: default {options['default']!r} is not a member; "
                    f"members: {list(self.members)}"
                )
            self.default = options["default"]

    async def _pick(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: Mapping[str, str] | None
    ) -> str:
        name, source = None, ""
        if self.choose is not None:
            name, source = await call_user(self.choose, *args, **kwargs), "choose()"
        if name is None and self.header is not None and headers is not None:
            name, source = headers.get(self.header), f"header '{self.header}'"
        if name is None and self.weights is not None:
            key = sticky_key(self.sticky_key, args, kwargs)
            u = random.random() if key is None else unit_hash(key, self.salt)
            name, source = pick_weighted(self.weights, u), "weights"
        if name is None:
            name, source = self.default, "default"
        if name is None:
            raise SelectionError(
                f"{self.what}: no member chosen (choose() gave None, no header, no weights, "
                f"no default); members: {list(self.members)}"
            )
        if name not in self.members:
            raise SelectionError(
                f"{self.what}: {source} chose {name!r}, which is not a member; "
                f"members: {list(self.members)}"
            )
        return str(name)

    async def _call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: Mapping[str, str] | None
    ) -> RoutedResult:
        name = await self._pick(args, kwargs, headers)
        self.counts[name] += 1
        value = await self.members[name].remote(*args, **kwargs)
        return RoutedResult(value, name, current_request_id())

    async def status_details(self) -> dict[str, Any]:
        """What ``serve.status()`` shows for this replica: requests per member, the weights."""
        details: dict[str, Any] = {"requests": dict(self.counts)}
        if self.weights is not None:
            details["weights"] = dict(self.weights)
        return details

    async def stats(self) -> dict[str, Any]:
        """Requests sent to each member by this replica, and the current weights."""
        return {
            "selector": self.name,
            "replica": replica_id(),
            "requests": self.counts,
            "weights": self.weights,
            "default": self.default,
        }
