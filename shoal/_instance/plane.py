"""The control plane of an instance (:class:`ControlPlane`): declarative config deploys,
deletes, details in Ray's REST shape, shutdown.

Config files are built (modules imported, builders called) in a short-lived
child process, never in the instance's own: user imports cannot crash or
pollute it, and an edited module is imported afresh at every deploy. Only the
built specs come back, with the user's code still pickled (see ``UserCode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from shoal._config import TIMEOUTS
from shoal._config.support import ray_only, runtime_env_ray_only
from shoal._controller.status import ApplicationStatus, ApplicationStatusOverview, ServeStatus
from shoal._errors import ConfigError, ShoalError
from shoal._instance.details import instance_details
from shoal._seam.specs import AppSpec

if TYPE_CHECKING:
    from shoal._deploy_config import ServeDeploySchema
    from shoal._instance.instance import Instance
    from shoal._observe.metrics.store import MetricsStore
    from shoal._seam.protocols import HelperProcess, Runtime

logger = logging.getLogger("shoal.controller")


@dataclass
class BuildResult:
    """One application of a config file, built in the child process (or why it failed)."""

    index: int
    name: str
    spec: AppSpec | None
    error: str | None


_CUT_SHORT = (
    "the server stopped while this application was being built; apply the config again "
    "(shoal deploy)"
)


@dataclass
class _Waiting:
    """An application of the last config that is not (or no longer) with the controller."""

    status: ApplicationStatus
    message: str
    route_prefix: str | None


def _grpc_differs(wanted: Any, running: Any) -> bool:
    """Whether a config's ``grpc_options`` ask for another gRPC server than the running one."""
    if wanted is None or not wanted.enabled:
        return False
    if running is None:
        return True
    port_differs = wanted.port not in (0, running.port)
    return port_differs or wanted.grpc_servicer_functions != running.grpc_servicer_functions


class InstanceControlPlane:
    """Implements :class:`shoal._instance.control.ControlPlane` on one instance's loop."""

    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self._configs: dict[str, dict[str, Any]] = {}  # app -> its deployed config (JSON)
        self._waiting: dict[str, _Waiting] = {}  # apps building, or whose build failed
        self._applying = asyncio.Lock()  # configs apply one after the other, in order
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._listed: set[str] = set()  # the applications the latest config lists
        self._dropped: set[str] = set()  # config-deployed ones a later config no longer lists

    # --- ControlPlane ------------------------------------------------------------------

    async def apply_config(self, config: ServeDeploySchema) -> None:
        self._check_instance_options(config)
        names = [app.name for app in config.applications]
        for app in config.applications:
            self._waiting[app.name] = _Waiting(ApplicationStatus.DEPLOYING, "", app.route_prefix)
        for name in list(self._waiting):
            if name not in names:
                del self._waiting[name]
        self._listed = set(names)  # an apply still running deploys nothing else
        # An application the new config drops must not keep the previous apply (which
        # holds the apply lock) waiting for its replicas' resources.
        for name in [n for n in self._instance.controller.apps if n not in names]:
            if self._configs.pop(name, None) is not None:
                self._dropped.add(name)
            self._instance.controller.abort_pending(name)
        self._checkpoint()
        self._spawn(self._apply(config))

    async def delete_app(self, name: str) -> None:
        self._configs.pop(name, None)
        self._dropped.discard(name)
        self._waiting.pop(name, None)
        self._listed.discard(name)  # an apply still building it deploys it no more
        controller = self._instance.controller
        if name in controller.apps or name in controller.failed:
            await controller.delete(name)
        else:
            self._checkpoint()

    async def delete_all(self) -> None:
        self._waiting.clear()
        self._dropped.clear()
        self._configs.clear()
        self._listed = set()  # an apply still building deploys nothing more
        controller = self._instance.controller
        await asyncio.gather(
            *(controller.delete(n) for n in [*controller.apps, *controller.failed]),
            return_exceptions=True,
        )
        self._checkpoint()

    def details(self) -> dict[str, Any]:
        declarative = set(self._configs) | set(self._waiting)
        return instance_details(self._instance, self.status(), self._configs, declarative)

    def metrics(self) -> MetricsStore:
        return self._instance.controller.metrics

    def log_directory(self) -> str | None:
        options = self._instance.telemetry.logging
        return options.logs_dir or options.directory

    async def shutdown(self) -> None:
        self._closing = True
        on_shutdown = self._instance.on_shutdown_requested
        if on_shutdown is None:
            raise ConfigError(
                "this instance is embedded in a Python process: stop it there with "
                "serve.shutdown() (only a `shoal start` server can be shut down remotely)"
            )
        on_shutdown()

    # --- bookkeeping ---------------------------------------------------------------------

    def configs(self) -> dict[str, dict[str, Any]]:
        """The config of each application deployed from a config file (for checkpoints)."""
        return dict(self._configs)

    def restore_configs(
        self, configs: dict[str, dict[str, Any]], unbuilt: dict[str, ApplicationStatusOverview]
    ) -> None:
        """Take back a checkpoint's configs, and its list of applications a config named
        that had nothing running: failed builds say why again, and a build the server's
        end cut short fails, saying to apply the config again (nothing retries it)."""
        self._configs.update(configs)
        for name, app in unbuilt.items():
            message = app.message
            if app.status != ApplicationStatus.DEPLOY_FAILED:
                message = _CUT_SHORT
            self._waiting[name] = _Waiting(
                ApplicationStatus.DEPLOY_FAILED, message, app.route_prefix
            )

    def _checkpoint(self) -> None:
        """Save the desired state now: a change of what only this plane knows (the
        controller saves after its own changes)."""
        self._instance.controller.on_change()

    def unbuilt(self) -> dict[str, ApplicationStatusOverview]:
        """The applications of the last config that have nothing running (building, or
        failed), for the checkpoint."""
        return {
            name: ApplicationStatusOverview(waiting.status, waiting.message, waiting.route_prefix)
            for name, waiting in self._waiting.items()
            if name not in self._instance.controller.apps
        }

    def deployed_imperatively(self, name: str) -> None:
        """``serve.run`` deployed ``name``: it no longer follows a config file."""
        self._configs.pop(name, None)
        self._waiting.pop(name, None)
        self._dropped.discard(name)

    def status(self) -> ServeStatus:
        """The controller's status with what the last config adds: an application it
        lists is DEPLOYING while it builds and DEPLOY_FAILED (with why) if its build
        failed, as Ray Serve reports it, even while its previous version keeps serving."""
        status = self._instance.controller.status()
        for name, waiting in self._waiting.items():
            app = status.applications.get(name)
            if app is None:
                app = ApplicationStatusOverview(waiting.status, route_prefix=waiting.route_prefix)
            status.applications[name] = replace(app, status=waiting.status, message=waiting.message)
        return status

    def _check_instance_options(self, config: ServeDeploySchema) -> None:
        """Warn about instance-wide HTTP options that differ from the running instance's:
        they are fixed when it starts. Ray Serve deploys such a file with a warning too
        (so files written for another port deploy); `shoal deploy` prints it as well.
        The same for ``tracing_options``. A ``runtime`` other than the instance's is
        refused: the file was written for another kind of instance."""
        if not self._instance.controller.runtime.places_replicas:
            found = [
                f"applications[{i}].deployments[{j}].{line}"
                for i, app in enumerate(config.applications)
                for j, deployment in enumerate(app.deployments)
                for line in ray_only(deployment)
            ]
            for i, app in enumerate(config.applications):
                found += runtime_env_ray_only(app.runtime_env, f"applications[{i}].runtime_env")
            if found:
                raise ConfigError("\n".join(found))
        running_runtime = self._instance.options.runtime
        if config.runtime is not None and config.runtime != running_runtime:
            raise ConfigError(
                f"runtime={config.runtime!r} in the config differs from the running "
                f"instance's runtime {running_runtime!r}: the runtime is chosen when the "
                "instance starts (shoal start --ray, or shoal run CONFIG); remove the field "
                "or deploy to an instance of that runtime"
            )
        tracing = config.tracing_options
        running = getattr(self._instance, "telemetry", None)
        if tracing is not None and running is not None and tracing != running.tracing:
            logger.warning(
                "tracing_options in the config differ from the running instance's and are "
                "ignored: tracing is set when the instance starts (shoal run CONFIG, or "
                "shoal start --tracing-options)"
            )
        if _grpc_differs(config.grpc_options, getattr(self._instance, "grpc", None)):
            logger.warning(
                "grpc_options in the config differ from the running instance's and are "
                "ignored: gRPC is set when the instance starts (shoal run CONFIG, or "
                "shoal start --grpc-port/--grpc-servicer-functions)"
            )
        http, wanted = self._instance.http, config.http_options
        if http is None or wanted is None:
            return
        for field in ("host", "port"):
            value = getattr(wanted, field)
            if field in wanted.model_fields_set and value != getattr(http, field):
                logger.warning(
                    "http_options.%s=%r in the config differs from the running instance's %r "
                    "and is ignored: HTTP options are fixed when the instance starts",
                    field, value, getattr(http, field),
                )  # fmt: skip

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, config: ServeDeploySchema) -> None:
        async with self._applying:
            if self._closing:
                return
            controller = self._instance.controller
            controller.set_target_capacity(config.target_capacity)
            names = {app.name for app in config.applications}
            for name in [n for n in controller.failed if n not in names]:
                await controller.delete(name)  # a failed serve.run's, listed: not in the set
            for name in [n for n in controller.apps if n not in names]:
                if name not in self._configs and name not in self._dropped:
                    logger.warning("deleting application '%s' (deployed with serve.run): the "
                                   "config file applied now does not list it", name)  # fmt: skip
                self._configs.pop(name, None)
                self._dropped.discard(name)
                with contextlib.suppress(ShoalError):
                    await controller.delete(name)
            try:
                runtime = self._instance.controller.runtime
                results = await build_in_child(config, TIMEOUTS.build_s, runtime)
            except ShoalError as exc:
                apps = enumerate(config.applications)
                results = [BuildResult(i, a.name, None, str(exc)) for i, a in apps]
            await asyncio.gather(*(self._deploy_built(config, r) for r in results))

    async def _deploy_built(self, config: ServeDeploySchema, result: BuildResult) -> None:
        if result.name not in self._listed:
            return  # a config applied since this one was built no longer lists it
        app_config = config.applications[result.index]
        if result.spec is None:
            message = result.error or "the build failed"
            self._waiting[result.name] = _Waiting(
                ApplicationStatus.DEPLOY_FAILED, message, app_config.route_prefix
            )
            logger.error("application '%s' failed to build: %s", result.name, message)
            self._checkpoint()
            return
        self._configs[result.name] = app_config.model_dump(mode="json", exclude_unset=True)
        self._waiting.pop(result.name, None)
        if app_config.autoscaling_policy is not None:
            result.spec.autoscaling_policy = app_config.autoscaling_policy.policy_function
        try:
            # Asked again under the app's lock: a delete may have held it meanwhile.
            await self._instance.controller.deploy(result.spec, lambda: result.name in self._listed)
        except Exception as exc:
            logger.error("application '%s' failed to deploy: %s", result.name, exc)
            dropped = result.name not in self._configs  # by a config applied since
            if result.name not in self._instance.controller.apps and not dropped:
                # A failed first deploy leaves nothing running: keep saying why.
                self._waiting[result.name] = _Waiting(
                    ApplicationStatus.DEPLOY_FAILED, str(exc), app_config.route_prefix
                )
                self._checkpoint()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)


async def build_in_child(
    config: ServeDeploySchema, timeout_s: float, runtime: Runtime | None = None
) -> list[BuildResult]:
    """Import and build every application of ``config`` in a child process: forked by
    ``runtime``'s fork server if it runs one (shoal is imported there already: ~0.05 s
    instead of ~0.7 s), else started with ``python -m``.

    The child has this process's working directory and environment; each
    application's runtime_env ``working_dir``/``py_modules`` are put on its path.
    Raises ShoalError if the child dies or exceeds ``timeout_s`` (it is killed).
    """
    workdir = tempfile.mkdtemp(prefix="shoal-build-")  # 0700: only this user reads it
    source, output = os.path.join(workdir, "config.json"), os.path.join(workdir, "built.pickle")
    try:
        with open(source, "w") as file:
            json.dump(config.model_dump(mode="json", exclude_unset=True), file)
        child = await _start_build(runtime, [output, source])
        try:
            code = await asyncio.wait_for(asyncio.shield(child.exited), timeout_s)
        except asyncio.CancelledError:
            child.kill()  # the instance stops: no build outlives it
            raise
        except TimeoutError:
            child.kill()
            await asyncio.wait([child.exited], timeout=TIMEOUTS.build_kill_s)
            raise ShoalError(
                f"building the applications did not finish within {timeout_s:.0f} s "
                "(importing the modules or calling the builders hangs?)"
            ) from None
        if code != 0:
            raise ShoalError(f"the build process exited with code {code}")
        with open(output, "rb") as file:
            results: list[BuildResult] = pickle.load(file)  # our own child wrote it
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _start_build(runtime: Runtime | None, argv: list[str]) -> HelperProcess:
    forked = None if runtime is None else await runtime.fork_helper("build", argv)
    if forked is not None:
        return forked
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal._instance.build_child", *argv,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return _Spawned(child)


class _Spawned:
    """A ``python -m`` build child, as a :class:`HelperProcess`."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        self.kill = child.kill
        self.exited: asyncio.Future[int] = asyncio.ensure_future(child.wait())
