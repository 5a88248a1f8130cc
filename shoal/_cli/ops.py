"""Operating an instance: ``shoal start/deploy/status/config/delete/shutdown/build``.

Every command but ``start`` and ``build`` talks to the admin REST API
(``client.py``), so they work against any shoal instance, embedded or started,
and the Serve parts against a Ray dashboard too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from shoal._cli.client import AdminClient, is_local_server, local_server
from shoal._config import TIMEOUTS

APPLICATIONS = "/api/serve/applications/"


def _yaml(value: Any) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        # Multi-line messages (tracebacks) print as blocks, readable, as in Ray's CLI.
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, text)
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=False, sort_keys=False)


def _load_config(command: str, path: str) -> Any:
    """The config file as written, once it validated locally (errors name the field path).

    What is sent is the document as written (unset fields stay unset), as Ray's CLI does.
    """
    from shoal._config_text import parse_document
    from shoal._deploy_config import load_config_file
    from shoal._errors import ConfigError

    try:
        load_config_file(path)
        return parse_document(Path(path).read_text(encoding="utf-8"), path)
    except ConfigError as exc:
        raise SystemExit(f"{command}: {exc}") from None


def deploy(args: argparse.Namespace) -> None:
    data = _load_config("shoal deploy", args.config)
    client = AdminClient("shoal deploy", args.address)
    running = (client.request("GET", APPLICATIONS) or {}).get("http_options") or {}
    for field, wanted in (data.get("http_options") or {}).items():
        if field in ("host", "port") and running.get(field) not in (None, wanted):
            print(
                f"shoal deploy: warning: http_options.{field} is {wanted!r} in {args.config} but "
                f"the instance serves HTTP on {running[field]!r}; HTTP options are fixed when an "
                "instance starts (`shoal start --http-...`), so this one is ignored",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    client.request("PUT", APPLICATIONS, data)
    names = [app.get("name", "default") for app in data.get("applications") or []]
    print(
        f"shoal deploy: {args.config} accepted by {client.address} "
        f"(applications: {', '.join(names) or 'none'}); they deploy in the background: "
        "watch them with `shoal status`",
        flush=True,
    )


def status_of(details: dict[str, Any]) -> dict[str, Any]:
    """``GET /api/serve/applications/`` in the shape Ray's ``serve status`` prints."""
    applications = {}
    for name, app in (details.get("applications") or {}).items():
        deployments = {
            dep_name: {
                "status": dep.get("status"),
                "status_trigger": dep.get("status_trigger"),
                "replica_states": dict(Counter(r.get("state") for r in dep.get("replicas") or [])),
                "message": dep.get("message", ""),
                **_scaling(dep),
                **_details(dep),
            }
            for dep_name, dep in (app.get("deployments") or {}).items()
        }
        applications[name] = {
            "status": app.get("status"),
            **({"route_prefix": app["route_prefix"]} if "route_prefix" in app else {}),
            # shoal's own, shown only when the application has one (docs/direct-ingress.md)
            **(
                {"direct_ingress_port": app["direct_ingress_port"]}
                if app.get("direct_ingress_port") is not None
                else {}
            ),
            "message": app.get("message", ""),
            "last_deployed_time_s": app.get("last_deployed_time_s"),
            "deployments": deployments,
        }
    return {
        "proxies": {
            node: proxy.get("status") for node, proxy in (details.get("proxies") or {}).items()
        },
        "applications": applications,
        "target_capacity": details.get("target_capacity"),
    }


def _details(deployment: dict[str, Any]) -> dict[str, Any]:
    """What the replicas reported (``status_details()``, batchers), by replica id."""
    details = {
        replica.get("replica_id"): replica["details"]
        for replica in deployment.get("replicas") or []
        if replica.get("details") is not None
    }
    return {"details": details} if details else {}


def _scaling(deployment: dict[str, Any]) -> dict[str, Any]:
    """The target replica count, whether the autoscaler sets it, and its last decisions
    (as ``print(serve.status())`` shows them), for ``shoal status``."""
    scaling: dict[str, Any] = {}
    if "target_num_replicas" in deployment:
        scaling["target_num_replicas"] = deployment["target_num_replicas"]
    if deployment.get("autoscaling"):
        scaling["autoscaling"] = True
    decisions = deployment.get("scaling_decisions") or []
    if decisions:
        scaling["scaling_decisions"] = [
            f"{time.strftime('%H:%M:%S', time.localtime(d['time']))} "
            f"{d['from_replicas']} -> {d['to_replicas']}: {d['reason']}"
            for d in decisions[-5:]
        ]
    return scaling


def status(args: argparse.Namespace) -> None:
    details = AdminClient("shoal status", args.address).request("GET", APPLICATIONS)
    print(_yaml(status_of(details or {})), end="", flush=True)


def config(args: argparse.Namespace) -> None:
    details = AdminClient("shoal config", args.address).request("GET", APPLICATIONS) or {}
    apps = details.get("applications") or {}
    if args.name is not None:
        if args.name not in apps:
            found = ", ".join(sorted(apps)) or "none"
            raise SystemExit(
                f"shoal config: no application named {args.name!r} (deployed: {found}); "
                "check --name against `shoal status`"
            )
        apps = {args.name: apps[args.name]}
    configs = [app.get("deployed_app_config") for app in apps.values()]
    configs = [c for c in configs if c]
    if not configs:
        print("shoal config: no application was deployed from a config", file=sys.stderr)
        return
    print("---\n".join(_yaml(c) for c in configs), end="", flush=True)


def delete(args: argparse.Namespace) -> None:
    client = AdminClient("shoal delete", args.address)
    apps = (client.request("GET", APPLICATIONS) or {}).get("applications") or {}
    if args.app not in apps:
        found = ", ".join(sorted(apps)) or "none"
        raise SystemExit(
            f"shoal delete: no application named {args.app!r} at {client.address} "
            f"(deployed: {found}); check the name with `shoal status`"
        )
    from urllib.parse import quote

    client.request("DELETE", APPLICATIONS + quote(args.app, safe=""))
    print(f"shoal delete: application {args.app!r} deleted", flush=True)


def shutdown(args: argparse.Namespace) -> None:
    client = AdminClient("shoal shutdown", args.address)
    if not args.yes:
        if not sys.stdin.isatty():
            raise SystemExit(
                f"shoal shutdown: this stops the instance at {client.address} and every "
                "application on it; pass -y to confirm"
            )
        answer = input(
            f"Stop the shoal instance at {client.address} and all its applications? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            raise SystemExit("shoal shutdown: cancelled")
    server = local_server()  # read first: the server removes its record as it stops
    client.request("POST", "/api/shoal/shutdown")
    deadline = time.monotonic() + TIMEOUTS.cli_shutdown_wait_s
    while client.answers():
        if time.monotonic() > deadline:
            raise SystemExit(
                f"shoal shutdown: the instance at {client.address} still answers after "
                f"{TIMEOUTS.cli_shutdown_wait_s:g} s; check its log, or stop its process"
            )
        time.sleep(0.1)
    if is_local_server(server, client.address):
        from shoal._instance.server import wait_stopped

        if not wait_stopped(server, max(deadline - time.monotonic(), 1.0)):
            raise SystemExit(
                f"shoal shutdown: the server process {server.pid} is still stopping after "
                f"{TIMEOUTS.cli_shutdown_wait_s:g} s; see {server.directory}/server.log"
            )
    print(f"shoal shutdown: the instance at {client.address} has stopped", flush=True)


def build(args: argparse.Namespace) -> None:
    from shoal._cli.target import load
    from shoal._instance.build import config_for

    apps = []
    for index, target in enumerate(args.targets):
        app = load(target, "shoal build")
        name = args.name if len(args.targets) == 1 and args.name else f"app{index + 1}"
        prefix = args.route_prefix if len(args.targets) == 1 else f"/{name}"
        apps.append(config_for(target, app, name, prefix))
    text = "# Written by `shoal build`; deploy it with `shoal deploy FILE`.\n\n"
    text += _yaml(_combine(apps))
    if args.output:
        Path(args.output).write_text(text)
        print(f"shoal build: wrote {args.output}", file=sys.stderr, flush=True)
    else:
        sys.stdout.write(text)


def _combine(apps: list[dict[str, Any]]) -> dict[str, Any]:
    """One config file from ``config_for``'s answers (each a file, or one application)."""
    if len(apps) == 1 and "applications" in apps[0]:
        return apps[0]
    combined: dict[str, Any] = {}
    entries: list[Any] = []
    for app in apps:
        if "applications" in app:
            entries += app["applications"]
            combined.update({k: v for k, v in app.items() if k != "applications"})
        else:
            entries.append(app)
    combined["applications"] = entries
    return combined


def _tracing_options(text: str | None) -> Any:
    """``--tracing-options`` (JSON), validated: a TracingOptions, or None if not given."""
    from shoal._config import TracingOptions

    return _json_option(text, TracingOptions, "--tracing-options", '{"enabled": true}')


def _logging_config(text: str | None) -> Any:
    """``--logging-config`` (JSON), validated: a LoggingConfig, or None if not given."""
    from shoal._config import LoggingConfig

    return _json_option(text, LoggingConfig, "--logging-config", '{"encoding": "JSON"}')


def _json_option(text: str | None, model: Any, flag: str, example: str) -> Any:
    """A ``shoal start`` option given as a JSON object, validated as ``model``."""
    from shoal._config import validate

    if text is None:
        return None
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(
            f"shoal start: {flag} is not JSON ({exc}); e.g. {flag} '{example}'"
        ) from None
    if not isinstance(given, dict):
        raise SystemExit(f"shoal start: {flag} must be a JSON object, got {text}")
    return validate(model, given, f"shoal start {flag}")


def start(args: argparse.Namespace) -> None:
    from shoal._config import (
        TIMEOUTS,
        AdminOptions,
        HTTPOptions,
        ServeStartOptions,
        gRPCOptions,
        validate,
    )
    from shoal._errors import ShoalError

    resources = _resources_argument(args.resources)
    try:
        http = validate(
            HTTPOptions, _given(host=args.http_host, port=args.http_port), "http_options"
        )
        admin = validate(
            AdminOptions, _given(host=args.admin_host, port=args.admin_port), "admin_options"
        )
        runtime = "ray" if args.ray else "process"
        validate(ServeStartOptions, _given(
            runtime=runtime, address=args.address, resources=resources or None,
        ), "shoal start")  # fmt: skip
        tracing = _tracing_options(args.tracing_options)
        logging_config = _logging_config(args.logging_config)
        grpc = None
        if args.grpc_servicer_functions or args.grpc_port is not None:
            grpc = validate(gRPCOptions, _given(
                port=args.grpc_port, grpc_servicer_functions=args.grpc_servicer_functions,
            ), "grpc_options")  # fmt: skip
        from shoal._instance.server import start_server

        info = start_server(
            http=http, admin=admin, proxy_location=args.proxy_location,
            resources={k: float(v) for k, v in resources.items()}, tracing=tracing,
            logging_config=logging_config, grpc=grpc, runtime=runtime, address=args.address,
            timeout_s=args.timeout or TIMEOUTS.server_start_s,
        )  # fmt: skip
    except ShoalError as exc:
        raise SystemExit(f"shoal start: {exc}") from None
    http_at = f"http://{info.http_host}:{info.http_port}" if info.http_port else "off"
    print(
        f"shoal start: serving (pid {info.pid}); HTTP proxy {http_at}, "
        f"admin API {info.admin_url or 'off'}; state in {info.directory}\n"
        "  deploy with `shoal deploy CONFIG`, inspect with `shoal status`, "
        "stop with `shoal shutdown`",
        flush=True,
    )
    if runtime == "ray":  # which node, and how to reach it from off the cluster
        from shoal._instance.ray_controller import where_note

        print(where_note(info), flush=True)


def _resources_argument(given: str | None) -> dict[str, Any]:
    """``shoal start --resources``: a JSON object of names to numbers (SystemExit if not)."""
    try:
        resources = json.loads(given) if given else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(
            f"shoal start: --resources is not JSON ({exc}); e.g. --resources '{{\"GPU\": 1}}'"
        ) from None
    if not isinstance(resources, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in resources.values()
    ):
        raise SystemExit(
            f"shoal start: --resources must map names to numbers, got {given}; "
            "e.g. --resources '{\"GPU\": 1}'"
        )
    return resources


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}
