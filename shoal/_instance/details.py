"""An instance described in the JSON shape of Ray's ``GET /api/serve/applications/``
(``ServeInstanceDetails``), so tools written for Ray Serve read it unchanged."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import TYPE_CHECKING, Any

from shoal._config import HTTPOptions, gRPCOptions

if TYPE_CHECKING:
    from shoal._controller.status import DeploymentStatusOverview, ServeStatus
    from shoal._instance.instance import Instance

#: This machine, as Ray names a node: one node per machine for the local runtimes.
NODE_ID = socket.gethostname()


def instance_details(
    instance: Instance,
    status: ServeStatus,
    configs: dict[str, dict[str, Any]],
    declarative: set[str],
) -> dict[str, Any]:
    """``status``: the instance's (with the applications its config files add);
    ``configs``: the deployed config of each application that came from a config file;
    ``declarative``: the applications a config file deployed (or is deploying)."""
    controller = instance.controller
    applications: dict[str, Any] = {}
    for name, app in status.applications.items():
        spec = controller.apps[name].spec if name in controller.apps else None
        applications[name] = {
            "name": name,
            "route_prefix": app.route_prefix,
            "docs_path": None,
            "status": str(app.status),
            "message": app.message,
            "last_deployed_time_s": app.last_deployed_time_s,
            "deployed_app_config": configs.get(name),
            "source": "declarative" if name in declarative else "imperative",
            "deployments": {
                d_name: _deployment(d_name, overview, spec)
                for d_name, overview in app.deployments.items()
            },
            "external_scaler_enabled": False,
            # shoal's own: where the ingress also serves HTTP itself (docs/direct-ingress.md)
            "direct_ingress_port": app.direct_ingress_port,
        }
    http = instance.http
    return {
        "controller_info": {"node_id": NODE_ID, "node_ip": "127.0.0.1", "pid": os.getpid()},
        "proxy_location": _proxy_location(instance),
        "http_options": (http or HTTPOptions()).model_dump(mode="json"),
        "grpc_options": (getattr(instance, "grpc", None) or gRPCOptions()).model_dump(mode="json"),
        "proxies": {
            # pid: shoal's own (which process serves that node's HTTP)
            node: {"node_id": node, "node_ip": proxy.host, "status": str(proxy), "pid": proxy.pid}
            for node, proxy in status.proxies.items()
        },
        "deploy_mode": "MULTI_APP",
        "applications": applications,
        "target_capacity": status.target_capacity,
    }


def _proxy_location(instance: Instance) -> str:
    """Where proxies run: Disabled, or as asked (EveryNode, the default, or HeadOnly; the
    same on one machine: docs/ray.md#proxies)."""
    if instance.http is None:
        return "Disabled"
    return instance.options.proxy_location or "EveryNode"


def _deployment(name: str, overview: DeploymentStatusOverview, spec: Any) -> dict[str, Any]:
    deployment = spec.deployments.get(name) if spec is not None else None
    config: dict[str, Any] = {"name": name}
    if deployment is not None:
        config.update(deployment.config.model_dump(mode="json", exclude={"name"}))
    return {
        "name": name,
        "status": str(overview.status),
        "status_trigger": _trigger(str(overview.status)),
        "message": overview.message,
        "deployment_config": config,
        "target_num_replicas": overview.target_replicas,
        "required_resources": _resources(config),
        # shoal's own: whether the autoscaler sets the target, its recent decisions (oldest
        # first)
        "autoscaling": overview.autoscaling,
        "scaling_decisions": [dataclasses.asdict(d) for d in overview.scaling_decisions],
        "replicas": [
            {
                "node_id": replica.node_id or NODE_ID,
                "node_ip": _host(replica.tcp_address) or "127.0.0.1",
                # shoal's own: where routers on other nodes reach it ("": Unix socket only)
                "tcp_address": replica.tcp_address,
                "replica_id": replica.replica_id,
                "state": str(replica.state),
                "pid": replica.pid,
                "message": replica.message,
                # shoal's own: what the replica reported (status_details(), its batchers)
                "details": replica.details,
            }
            for replica in overview.replicas
        ],
    }


def _host(address: str) -> str:
    """The host of a "host:port" or "[v6]:port" address; "" for ""."""
    return address.rpartition(":")[0].strip("[]")


def _trigger(status: str) -> str:
    """Ray's ``status_trigger`` closest to what shoal knows of a deployment's status."""
    return {
        "HEALTHY": "CONFIG_UPDATE_COMPLETED",
        "UPDATING": "CONFIG_UPDATE_STARTED",
        "UNHEALTHY": "HEALTH_CHECK_FAILED",
        "UPSCALING": "AUTOSCALING",
        "DOWNSCALING": "AUTOSCALING",
        "DEPLOY_FAILED": "REPLICA_STARTUP_FAILED",
    }.get(status, "UNSPECIFIED")


def _resources(config: dict[str, Any]) -> dict[str, float]:
    actor = config.get("ray_actor_options") or {}
    resources = {"CPU": actor.get("num_cpus", 0.0)}
    if actor.get("num_gpus"):
        resources["GPU"] = actor["num_gpus"]
    resources.update(actor.get("resources") or {})
    return resources
