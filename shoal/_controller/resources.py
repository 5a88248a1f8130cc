"""The resource ledger: what this machine offers replicas, and what each replica holds.

Guarantees:
- a replica starts only once its ``num_cpus``, ``num_gpus`` and custom
  ``resources`` are all free; it holds them until it has stopped or died;
- GPUs are assigned by id: a replica asking for ``n >= 1`` GPUs gets ``n`` whole
  ones, a fraction below 1 shares one GPU (packed onto the fullest that fits);
- waiters are retried in arrival order whenever something is released.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal._config import DeploymentConfig, RayActorOptions
from shoal._errors import DeploymentError

_EPS = 1e-9  # float sums of fractions (0.1 + 0.2) must not make a fitting replica short


@dataclass(frozen=True)
class Demand:
    """What one replica reserves."""

    cpus: float = 0.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, options: RayActorOptions) -> Demand:
        return cls(options.num_cpus, options.num_gpus, dict(options.resources))

    def times(self, count: int) -> Demand:
        return Demand(
            self.cpus * count, self.gpus * count, {k: v * count for k, v in self.custom.items()}
        )

    def plus(self, other: Demand) -> Demand:
        custom = dict(self.custom)
        for key, amount in other.custom.items():
            custom[key] = custom.get(key, 0.0) + amount
        return Demand(self.cpus + other.cpus, self.gpus + other.gpus, custom)

    @property
    def empty(self) -> bool:
        return self.cpus <= 0 and self.gpus <= 0 and not any(self.custom.values())


@dataclass(frozen=True)
class Grant:
    """Resources held by one replica; ``gpu_ids`` are the GPUs it may see."""

    demand: Demand
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Capacity:
    """The machine's totals."""

    cpus: float
    gpu_ids: tuple[str, ...]
    custom: dict[str, float]

    @classmethod
    def detect(cls, custom: dict[str, float], timeout_s: float) -> Capacity:
        """CPUs this process may run on, GPUs it can see, and the declared custom resources."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        return cls(float(cpus), _visible_gpus(timeout_s), dict(custom))


def _visible_gpus(timeout_s: float) -> tuple[str, ...]:
    """GPU ids from CUDA_VISIBLE_DEVICES if set (as CUDA itself does), else ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = tuple(part.strip() for part in visible.split(",") if part.strip())
        # CUDA stops at the first invalid id; "-1" and "NoDevFiles" hide every GPU.
        return tuple(ids[: next((i for i, x in enumerate(ids) if x.startswith("-")), len(ids))])
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout_s, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(count))


def _fmt(amount: float) -> str:
    return f"{amount:g}"


class Ledger:
    """Free and held resources of one shoal instance (one machine)."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.free_cpus = capacity.cpus
        self.free_gpus = dict.fromkeys(capacity.gpu_ids, 1.0)
        self.free_custom = dict(capacity.custom)
        self._waiters: list[asyncio.Future[None]] = []
        self._closed: str | None = None

    # --- checks ---------------------------------------------------------------------

    def never_fits(self, demand: Demand) -> str | None:
        """Why ``demand`` exceeds the machine's totals, or None if it can fit when all is free."""
        total = self.capacity
        if demand.cpus > total.cpus + _EPS:
            return f"num_cpus={_fmt(demand.cpus)} but this machine has {_fmt(total.cpus)} CPUs"
        if demand.gpus > len(total.gpu_ids) + _EPS:
            return (
                f"num_gpus={_fmt(demand.gpus)} but this machine has {len(total.gpu_ids)} GPUs "
                "(from CUDA_VISIBLE_DEVICES or nvidia-smi)"
            )
        for key, amount in demand.custom.items():
            if amount <= 0:
                continue
            if key not in total.custom:
                return (
                    f"resources={{{key!r}: {_fmt(amount)}}} but this machine declares no {key!r}; "
                    f"declare it with serve.start(resources={{{key!r}: ...}})"
                )
            if amount > total.custom[key] + _EPS:
                return (
                    f"resources={{{key!r}: {_fmt(amount)}}} but this machine has "
                    f"{_fmt(total.custom[key])} {key!r}"
                )
        return None

    def shortage(self, demand: Demand) -> str | None:
        """Which resource is short for ``demand`` now, or None if it fits."""
        if demand.cpus > self.free_cpus + _EPS:
            return (
                f"replica needs num_cpus={_fmt(demand.cpus)} but {_fmt(self.free_cpus)} of "
                f"{_fmt(self.capacity.cpus)} CPUs are free"
            )
        if demand.gpus > 0 and self._pick_gpus(demand.gpus) is None:
            free = sum(self.free_gpus.values())
            return (
                f"replica needs num_gpus={_fmt(demand.gpus)} but {_fmt(free)} of "
                f"{len(self.free_gpus)} GPUs are free"
            )
        for key, amount in demand.custom.items():
            free = self.free_custom.get(key, 0.0)
            if amount > free + _EPS:
                return (
                    f"replica needs resources={{{key!r}: {_fmt(amount)}}} but {_fmt(free)} of "
                    f"{_fmt(self.capacity.custom.get(key, 0.0))} {key!r} are free"
                )
        return None

    # --- reserving ------------------------------------------------------------------

    def try_acquire(self, demand: Demand) -> Grant | None:
        """Reserve ``demand`` if it fits now."""
        if self.shortage(demand) is not None:
            return None
        gpu_ids = (self._pick_gpus(demand.gpus) or ()) if demand.gpus > 0 else ()
        share = demand.gpus if demand.gpus < 1 else 1.0
        for gpu in gpu_ids:
            self.free_gpus[gpu] -= share
        self.free_cpus -= demand.cpus
        for key, amount in demand.custom.items():
            self.free_custom[key] = self.free_custom.get(key, 0.0) - amount
        return Grant(demand, tuple(gpu_ids))

    async def acquire(self, demand: Demand, on_wait: Callable[[str], None]) -> Grant:
        """Reserve ``demand``, waiting until it fits; ``on_wait`` gets the reason while waiting.

        Raises DeploymentError if the ledger is closed (shutdown) while waiting.
        """
        while True:
            if self._closed is not None:
                raise DeploymentError(self._closed)
            grant = self.try_acquire(demand)
            if grant is not None:
                return grant
            on_wait(self.shortage(demand) or "")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self, grant: Grant | None) -> None:
        """Give back what ``grant`` holds (None is ignored) and wake the waiters."""
        if grant is None:
            return
        demand = grant.demand
        share = demand.gpus if demand.gpus < 1 else 1.0
        for gpu in grant.gpu_ids:
            self.free_gpus[gpu] = min(1.0, self.free_gpus[gpu] + share)
        self.free_cpus = min(self.capacity.cpus, self.free_cpus + demand.cpus)
        for key, amount in demand.custom.items():
            self.free_custom[key] = self.free_custom.get(key, 0.0) + amount
        self._wake()

    def close(self, reason: str) -> None:
        """Fail every waiter (and later ones) with DeploymentError(reason)."""
        self._closed = reason
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _pick_gpus(self, amount: float) -> tuple[str, ...] | None:
        if amount < 1:  # a share: the fullest GPU that still has room (packs fractions)
            fits = [g for g, free in self.free_gpus.items() if free + _EPS >= amount]
            return (min(fits, key=lambda g: self.free_gpus[g]),) if fits else None
        whole = [g for g, free in self.free_gpus.items() if free >= 1.0 - _EPS]
        return tuple(whole[: int(amount)]) if len(whole) >= int(amount) else None


class UnaccountedLedger(Ledger):
    """A ledger that grants every demand at once: the runtime's cluster (Ray) places
    replicas and accounts their resources, and says why one waits."""

    def __init__(self) -> None:
        super().__init__(Capacity(0.0, (), {}))

    def never_fits(self, demand: Demand) -> str | None:
        return None

    def shortage(self, demand: Demand) -> str | None:
        return None

    def try_acquire(self, demand: Demand) -> Grant | None:
        return Grant(demand)

    def release(self, grant: Grant | None) -> None:
        pass


def with_gpus(config: DeploymentConfig, grant: Grant) -> DeploymentConfig:
    """``config`` with CUDA_VISIBLE_DEVICES set to the granted GPUs (if any) in its env_vars."""
    if not grant.gpu_ids:
        return config
    actor = config.ray_actor_options
    env = dict(actor.runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "CUDA_VISIBLE_DEVICES": ",".join(grant.gpu_ids)}
    return config.model_copy(
        update={"ray_actor_options": actor.model_copy(update={"runtime_env": env})}
    )
