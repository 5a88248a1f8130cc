"""Runtimes by name: an instance asks for ``create_runtime("process")``, not for a class.

Built-in names: ``"local"`` (every replica an object on the driver's loop:
``_local_testing_mode``), ``"process"`` (one OS process per replica, the
default), ``"ray"`` (one Ray actor per replica, ``pip install "shoal[ray]"``) and
``"simulated"`` (replicas as objects on simulated nodes: a capacity-planning and testing
tool, never for serving; ``docs/scaling.md``).
Their modules are imported only when one is created, so a runtime
that needs optional packages (Ray) costs nothing until it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shoal._errors import ConfigError
from shoal._seam.protocols import Runtime

RuntimeFactory = Callable[..., Runtime]

_factories: dict[str, RuntimeFactory] = {}


def register_runtime(name: str, factory: RuntimeFactory) -> None:
    """Make ``create_runtime(name, **options)`` call ``factory(**options)``.

    Registering a name a second time is an error (two plugins claiming one name),
    unless it is the same factory again (a module imported twice).
    """
    known = _factories.get(name)
    if known is not None and known is not factory:
        raise ConfigError(f"a runtime named '{name}' is already registered ({known!r})")
    _factories[name] = factory


def create_runtime(name: str, **options: Any) -> Runtime:
    """A new, not yet started runtime; ConfigError naming the known runtimes if ``name``
    is not one. ``options`` go to the runtime's constructor as they are."""
    factory = _factories.get(name)
    if factory is None:
        raise ConfigError(f"unknown runtime '{name}'; known runtimes: {', '.join(runtime_names())}")
    return factory(**options)


def runtime_names() -> list[str]:
    """The registered runtime names, sorted."""
    return sorted(_factories)


def _local(**options: Any) -> Runtime:
    from shoal._runtime.inprocess import InProcessRuntime

    return InProcessRuntime(**options)


def _process(**options: Any) -> Runtime:
    from shoal._runtime.process.runtime import ProcessRuntime

    return ProcessRuntime(**options)


def _ray(**options: Any) -> Runtime:
    from shoal._runtime.ray.runtime import RayRuntime

    return RayRuntime(**options)


register_runtime("local", _local)
register_runtime("process", _process)
register_runtime("ray", _ray)


def _simulated(**options: Any) -> Runtime:
    """A simulated cluster in memory, for capacity planning and tests (never serving)."""
    from shoal._runtime.simulated import SimulatedRuntime

    return SimulatedRuntime(**options)


register_runtime("simulated", _simulated)
