"""``python -m bench.scale``: the real controller managing a simulated cluster.

Issue 13's simulation target: with an in-memory runtime (``shoal/_runtime/simulated.py``),
the controller manages 2,000 replicas on 100 simulated nodes with a reconcile pass
≤ 100 ms and a replica-set change reaching every router in ≤ 1 s. For 500/1,000/2,000
replicas on 25/50/100 nodes (20 deployments of equal size, one application each,
deployed through ``Controller.deploy`` as ``serve.run`` does), it measures:

- **deploy**: wall time, replica-set updates sent, messages and bytes (plus the
  current sets every new process gets first: catch-up);
- **reconcile pass**: the controller has no single loop; each deployment's
  ``Supervisor`` looks at its replicas every tick (a ping each, a health check each
  when due). A pass is every deployment's ``Supervisor.tick`` with the health checks
  due (the heaviest tick), timed until every ping and check it started has answered
  (simulated replicas answer after one loop turn). p50 and max of ``--passes``;
- **a pass while one replica set changes**: a replica crashes just before the pass;
  the wall time includes delivering the new sets to every simulated process (all
  recipients on this one CPU), and the controller's share excludes the recipients'
  decoding and applying;
- **propagation**: from a replica's crash until every router (every simulated process
  and the controller's) has dropped it, and until every router has its replacement;
  from a redeploy at ``num_replicas + 1`` until every router has the new replica;
- per update: messages (one per process holding routers), bytes (all frames), the
  controller's encoding time, one recipient's decoding time, the serial apply time.

Every process runs on one event loop here, so a delivery costs the sum of all the
recipients' work, where a cluster does it in parallel: the propagation measured is an
upper bound of the control plane's share (no network). Results go to
``bench/results/scale-<UTC timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench.procs import ForeignCpu, git_dirty
from shoal import serve
from shoal._api.graph import build_app
from shoal._controller.controller import Controller
from shoal._controller.resources import UnaccountedLedger
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import new_event_loop
from shoal._runtime.registry import create_runtime
from shoal._runtime.simulated import SimulatedRuntime, UpdateStats
from shoal._seam.specs import AppSpec

SIZES = ((500, 25), (1000, 50), (2000, 100))  # (replicas, nodes)
DEPLOYMENTS = 20
PASS_TARGET_S = 0.100
PROPAGATION_TARGET_S = 1.0
#: Far beyond any measurement: the supervisors' own ticks stay out of the way.
_PERIOD_S = 3600.0


class _Simulated:
    """Never constructed: simulated replicas run no user code."""

    def __call__(self) -> None:
        return None


Simulated = serve.deployment(
    _Simulated, name="Simulated", health_check_period_s=_PERIOD_S, health_check_timeout_s=_PERIOD_S
)


def run(coro: Any) -> Any:
    """Run ``coro`` on the event loop the controller has in production (uvloop)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def app_specs(replicas: int, deployments: int = DEPLOYMENTS) -> list[AppSpec]:
    """``deployments`` applications of one deployment each, ``replicas`` in all."""
    if replicas % deployments:
        raise ValueError(f"replicas={replicas} is not a multiple of deployments={deployments}")
    each = replicas // deployments
    return [spec_of(f"app{i:02d}", each) for i in range(deployments)]


def spec_of(name: str, replicas: int) -> AppSpec:
    return build_app(Simulated.options(num_replicas=replicas).bind(), name, None, None)


async def start(nodes: int, encode: str = "per_recipient") -> tuple[Controller, SimulatedRuntime]:
    runtime = create_runtime("simulated", nodes=nodes, encode=encode)
    assert isinstance(runtime, SimulatedRuntime)
    registry = RouterRegistry(runtime.connector, asyncio.get_running_loop())
    controller = Controller(runtime, registry, UnaccountedLedger())
    await controller.start(None)
    return controller, runtime


def states(controller: Controller) -> list[Any]:
    return [state for app in controller.apps.values() for state in app.deployments.values()]


async def reconcile_pass(controller: Controller, checks: bool = True) -> tuple[float, int]:
    """One pass (every deployment's supervisor tick; with ``checks``, every health check
    is due), until every ping and check it started has answered: (wall s, tasks)."""
    started = time.perf_counter()
    now = time.monotonic() + (2 * _PERIOD_S if checks else 0.0)
    tasks = []
    for state in states(controller):
        config = state.spec.config
        tasks += state.supervisor.tick(config, config.health_check_timeout_s / 5, now)
    await asyncio.gather(*tasks)
    return time.perf_counter() - started, len(tasks)


def routers_agree(controller: Controller, runtime: SimulatedRuntime, app: str, count: int) -> bool:
    """Whether every registry's router of ``app`` knows ``count`` replicas."""
    registries = [controller.registry, *runtime.registries()]
    name = controller.ingress_of(app)
    return all(len(r.get(app, name)._infos) == count for r in registries)


def _set_of(update: Any) -> set[str]:
    return {info.replica_id for info in update.replicas}


def _update_figures(stats: UpdateStats) -> dict[str, Any]:
    return {
        "replicas_in_set": stats.replicas, "messages": stats.messages, "bytes": stats.bytes,
        "frame_bytes": stats.frame_bytes, "encode_ms": stats.encode_s * 1e3,
        "decode_one_ms": stats.decode_s * 1e3, "apply_all_ms": stats.apply_s * 1e3,
        "apply_one_us": stats.apply_s / max(1, stats.messages) * 1e6,
        "modelled_parallel_ms": (stats.encode_s + stats.decode_s
                                 + stats.apply_s / max(1, stats.messages)) * 1e3,
    }  # fmt: skip


async def measure(replicas: int, nodes: int, passes: int, encode: str) -> dict[str, Any]:
    """Every figure of one cluster size (see the module's docstring)."""
    controller, runtime = await start(nodes, encode)
    specs = app_specs(replicas)
    each = replicas // len(specs)
    out: dict[str, Any] = {"replicas": replicas, "nodes": nodes, "deployments": len(specs),
                           "encode": encode}  # fmt: skip
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(controller.deploy(spec) for spec in specs))
        out["deploy_s"] = time.perf_counter() - t0
        out["processes"] = len(runtime.processes)
        out["deploy_updates"] = len(runtime.updates)
        out["deploy_messages"] = sum(u.messages for u in runtime.updates)
        out["deploy_bytes"] = sum(u.bytes for u in runtime.updates)
        out["catch_up_messages"] = runtime.catch_up_messages
        out["catch_up_bytes"] = runtime.catch_up_bytes
        out["routers_agree"] = all(routers_agree(controller, runtime, s.name, each) for s in specs)
        # The simulated processes' objects (2,100 registries) would live in other processes:
        # out of the collector's view, so that its passes over them do not count here.
        gc.collect()
        gc.freeze()
        pings = []
        for _ in range(passes):
            cpu_started = time.process_time()
            await reconcile_pass(controller, checks=False)
            pings.append((time.process_time() - cpu_started) * 1e3)
        out["ping_pass_cpu_p50_ms"] = statistics.median(pings)
        steady, cpu = [], []
        for _ in range(passes):
            cpu_started = time.process_time()
            steady.append(await reconcile_pass(controller))
            cpu.append((time.process_time() - cpu_started) * 1e3)
        out["pass_tasks"] = steady[0][1]
        out["pass_ms"] = [s * 1e3 for s, _ in steady]
        out["pass_p50_ms"] = statistics.median(out["pass_ms"])
        out["pass_max_ms"] = max(out["pass_ms"])
        out["pass_cpu_ms"] = cpu  # this process's CPU: other jobs stretch wall time only
        out["pass_cpu_p50_ms"] = statistics.median(cpu)
        out["pass_cpu_max_ms"] = max(cpu)
        out.update(await _replica_dies(controller, runtime, specs[0].name, each))
        out.update(await _scale_up(controller, runtime, specs[1], each))
        out["status_ms"] = _timed(controller.status) * 1e3
        out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        await controller.shutdown(30.0)
        gc.unfreeze()
    return out


async def _replica_dies(
    controller: Controller, runtime: SimulatedRuntime, app: str, each: int
) -> dict[str, Any]:
    """A replica crashes; a pass runs at once; then its replacement reaches every router."""
    state = controller.apps[app].deployments[controller.ingress_of(app)]
    victim = state.replicas[0].handle.info.replica_id

    def mine(update: Any) -> bool:
        return update.app == app and victim not in _set_of(update)

    dropped = runtime.when_applied(mine)
    replaced = runtime.when_applied(lambda u: mine(u) and len(u.replicas) == each)
    first = len(runtime.updates)
    catch_up = runtime.catch_up_messages, runtime.catch_up_bytes
    t0 = time.perf_counter()
    runtime.crash_replica(victim)
    pass_s, _tasks = await reconcile_pass(controller)
    pass_end = t0 + pass_s
    drop_at, replaced_at = await dropped, await replaced
    during = [u for u in runtime.updates[first:] if u.ended <= pass_end]
    recipients = sum(u.decode_s + u.apply_s for u in during)
    last = next(u for u in reversed(runtime.updates) if u.app == app)
    return {
        "pass_change_ms": pass_s * 1e3,
        "pass_change_controller_ms": (pass_s - recipients) * 1e3,
        "died_drop_s": drop_at - t0,
        "died_replaced_s": replaced_at - t0,
        "died_updates": len(runtime.updates) - first,
        # What the replacement's process got before serving: every current set.
        "new_process_catch_up_messages": runtime.catch_up_messages - catch_up[0],
        "new_process_catch_up_bytes": runtime.catch_up_bytes - catch_up[1],
        "update": _update_figures(last),
    }


async def _scale_up(
    controller: Controller, runtime: SimulatedRuntime, spec: AppSpec, each: int
) -> dict[str, Any]:
    """A redeploy at ``num_replicas + 1`` (the real deploy path) until every router has it."""
    bigger = spec_of(spec.name, each + 1)
    arrived = runtime.when_applied(lambda u: u.app == spec.name and len(u.replicas) == each + 1)
    first = len(runtime.updates)
    t0 = time.perf_counter()
    await controller.deploy(bigger)
    arrived_at = await arrived
    return {
        "scale_s": arrived_at - t0,
        "scale_deploy_returned_s": time.perf_counter() - t0,
        "scale_updates": len(runtime.updates) - first,
        "scale_routers_agree": routers_agree(controller, runtime, spec.name, each + 1),
    }


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def render(results: dict[str, Any]) -> str:
    env, foreign = results["environment"], results["foreign"]
    lines = [
        "# Scale: the real controller on a simulated cluster (bench/scale.py)",
        "",
        f"- commit {env['git_commit']} (dirty tree: {results['dirty']}); "
        f"{env['machine']['nproc']} CPUs, {env['machine']['cpu_model']}",
        f"- foreign CPU during the run: {foreign['foreign_core_pct']}% of one core "
        f"(load average {foreign['loadavg_1m']}); pass CPU is this process's CPU time",
        "- every simulated process runs on one event loop: a delivery's wall time is the sum "
        "of every recipient's work (an upper bound); 'modelled' = the controller's encoding + "
        "one recipient's decode and apply",
        f"- targets: pass ≤ {PASS_TARGET_S * 1e3:g} ms (judged on CPU p50), a change at "
        f"every router ≤ {PROPAGATION_TARGET_S:g} s (died→replaced and scale→all, wall)",
        "",
        *_times_table(results["runs"]),
        "",
        *_traffic_table(results["runs"]),
    ]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _times_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| replicas | nodes | encode | processes | ping-only pass CPU p50 ms | pass CPU "
        "p50/max ms | pass wall p50/max ms "
        "| pass w/ change ms (controller) | died→dropped s | died→replaced s | scale→all s "
        "| pass | change |",
        "| " + " | ".join(["---"] * 13) + " |",
    ]
    for r in runs:
        change = max(r["died_replaced_s"], r["scale_s"])
        lines.append(
            f"| {r['replicas']:,} | {r['nodes']} | {r['encode']} | {r['processes']:,} | "
            f"{r['ping_pass_cpu_p50_ms']:.1f} | "
            f"{r['pass_cpu_p50_ms']:.1f} / {r['pass_cpu_max_ms']:.1f} | "
            f"{r['pass_p50_ms']:.1f} / {r['pass_max_ms']:.1f} | {r['pass_change_ms']:.0f} "
            f"({r['pass_change_controller_ms']:.0f}) | {r['died_drop_s']:.3f} | "
            f"{r['died_replaced_s']:.3f} | {r['scale_s']:.3f} | "
            f"{_verdict(r['pass_cpu_p50_ms'] <= PASS_TARGET_S * 1e3)} | "
            f"{_verdict(change <= PROPAGATION_TARGET_S)} |"
        )
    return lines


def _traffic_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| replicas | encode | messages/update | bytes/update | frame B | encode ms | "
        "decode µs | apply µs/proc | modelled ms | deploy s | deploy updates | deploy "
        "messages | deploy bytes | new process catch-up msgs / bytes | status() ms | "
        "max RSS MB |",
        "| " + " | ".join(["---"] * 16) + " |",
    ]
    for r in runs:
        u = r["update"]
        lines.append(
            f"| {r['replicas']:,} | {r['encode']} | {u['messages']:,} | {u['bytes']:,} | "
            f"{u['frame_bytes']:,} | {u['encode_ms']:.1f} | {u['decode_one_ms'] * 1e3:.0f} | "
            f"{u['apply_one_us']:.1f} | {u['modelled_parallel_ms']:.1f} | "
            f"{r['deploy_s']:.2f} | {r['deploy_updates']:,} | {r['deploy_messages']:,} | "
            f"{r['deploy_bytes']:,} | {r['new_process_catch_up_messages']} / "
            f"{r['new_process_catch_up_bytes']:,} | {r['status_ms']:.1f} | "
            f"{r['max_rss_mb']:.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--passes", type=int, default=20, help="reconcile passes per size")
    parser.add_argument("--sizes", default=",".join(f"{r}/{n}" for r, n in SIZES),
                        help="replicas/nodes,... (default %(default)s)")  # fmt: skip
    parser.add_argument("--also-per-update", action="store_true",
                        help="also run the largest size with one frame per update")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="results not written")
    args = parser.parse_args(argv)
    sizes = [tuple(int(x) for x in size.split("/")) for size in args.sizes.split(",")]
    from bench import report

    started = datetime.now(UTC)
    env = report.environment({"name": "none"}, started)
    meter = ForeignCpu(interval_s=None)
    runs = []
    for replicas, nodes in sizes:
        runs.append(run(measure(replicas, nodes, args.passes, "per_recipient")))
        gc.collect()
    if args.also_per_update:
        replicas, nodes = sizes[-1]
        runs.append(run(measure(replicas, nodes, args.passes, "per_update")))
    results = {"started": started.isoformat(timespec="seconds"), "environment": env,
               "dirty": git_dirty(), "foreign": meter.window(), "runs": runs}  # fmt: skip
    meter.close()
    text = render(results)
    print(text)
    if not args.quick:
        report.write_named_results("scale", started, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
