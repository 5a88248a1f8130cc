"""Which deployment options each runtime implements: the others are refused by name.

:data:`RAY_ONLY`, and ``runtime_env`` keys other than :data:`RUNTIME_ENV_KEYS` (or remote
URIs), are implemented by the Ray runtime, which hands them to Ray; they are accepted
in code and config files (the same code may be deployed on Ray) and refused when a local
runtime deploys them (:func:`ray_only`). An option no runtime implements yet is not
declared at all: pydantic refuses it as unknown; except one whose Ray default is what
shoal does, which is declared and refuses any other value by name
(:data:`EXTERNAL_SCALER_NOT_YET`).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

#: Options only the Ray runtime implements -> what they are.
RAY_ONLY: dict[str, str] = {
    "ray_actor_options.memory": "memory reservations",
    "ray_actor_options.object_store_memory": "object store reservations",
    "ray_actor_options.accelerator_type": "accelerator types (or use num_gpus)",
    "placement_group_bundles": "placement groups",
    "placement_group_strategy": "placement groups",
    "max_replicas_per_node": "replicas per node (on one machine, every replica runs on the "
    "same node)",
}

#: runtime_env keys every runtime implements (local paths); Ray implements all of its own.
RUNTIME_ENV_KEYS = ("env_vars", "working_dir", "py_modules")

NEEDS_RAY = (
    "it needs the Ray runtime (serve.start(runtime='ray') or shoal start --ray; docs/ray.md)"
)

#: Deployment options of Ray Serve that shoal does not declare yet -> why, and what to do.
RAY_NOT_YET: dict[str, str] = {
    "max_constructor_retry_count": "shoal fails a deploy at the first failed constructor, "
    "where Ray starts the replica again (docs/ray-compatibility.md); remove it, and retry "
    "a transient failure inside the constructor",
    "request_router_config": "shoal routes by the power of two choices (a replica holding "
    "the multiplexed model first) and takes no custom router; remove it",
}


NAME_WITHOUT_HASH = (
    "must not contain '#': it joins application, deployment and replica in a replica id"
)


def check_name(value: str | None) -> str | None:
    """Ray's rule for application and deployment names (a ``#`` would make replica
    ids, log file names and recovered checkpoints ambiguous)."""
    if value is not None and "#" in value:
        raise ValueError(NAME_WITHOUT_HASH)
    return value


def not_yet(option: str) -> str | None:
    """What to say of ``option`` if it is one of :data:`RAY_NOT_YET` (else None)."""
    why = RAY_NOT_YET.get(option)
    return None if why is None else f"is Ray Serve's and not supported yet: {why}"


#: Why ``external_scaler_enabled=True`` is refused (Ray Serve's external scaling: another
#: process sets a deployment's replica count over REST); False, Ray's default, is what
#: shoal does.
EXTERNAL_SCALER_NOT_YET = (
    "is not supported yet: shoal has no external scaling API "
    "(Ray's POST /api/v1/applications/{app}/deployments/{deployment}/scale); set the "
    "count with num_replicas (a deploy that changes only it starts or stops replicas, "
    "nothing else) or let autoscaling_config set it"
)


def _is_set(config: Any, option: str) -> bool:
    owner: BaseModel = config
    *parents, leaf = option.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return bool(getattr(owner, leaf) != type(owner).model_fields[leaf].default)


def _value(config: Any, option: str) -> Any:
    for part in option.split("."):
        config = getattr(config, part)
    return config


def ray_only(config: Any) -> list[str]:
    """One message per option ``config`` sets that only the Ray runtime implements."""
    found = [
        f"{option}={_value(config, option)!r} ({what}): {NEEDS_RAY}"
        for option, what in RAY_ONLY.items()
        if _is_set(config, option)
    ]
    return found + runtime_env_ray_only(config.ray_actor_options.runtime_env)


def runtime_env_ray_only(
    env: dict[str, Any] | None, path: str = "ray_actor_options.runtime_env"
) -> list[str]:
    """One message per key of ``env`` (at ``path``) that only the Ray runtime implements."""
    found = []
    for key, value in (env or {}).items():
        name = f"{path}.{key}"
        if key not in RUNTIME_ENV_KEYS:
            hint = _did_you_mean(str(key), RUNTIME_ENV_KEYS)
            found.append(
                f"{name}={value!r}: {NEEDS_RAY}; every runtime supports "
                f"{', '.join(RUNTIME_ENV_KEYS)} (local paths){hint}"
            )
        elif key != "env_vars" and any("://" in p for p in _paths(key, value) or []):
            found.append(f"{name}={value!r}: remote URIs: {NEEDS_RAY}; or pass a local path")
    return found


def runtime_env_problems(env: dict[str, Any] | None) -> list[str]:
    """What is wrong with the keys of a ``runtime_env`` every runtime implements (empty if
    nothing is); the other keys are Ray's to check (see :func:`ray_only`)."""
    problems = []
    for key, value in (env or {}).items():
        name = f"ray_actor_options.runtime_env.{key}"
        if key == "env_vars":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                problems.append(f"invalid {name}={value!r}: it must map strings to strings")
        elif key in RUNTIME_ENV_KEYS and _paths(key, value) is None:
            what = "a path (str)" if key == "working_dir" else "a list of paths (str)"
            problems.append(f"invalid {name}={value!r}: it must be {what}")
    return problems


def _paths(key: str, value: Any) -> list[str] | None:
    """The paths of a working_dir or py_modules value; None if it is not made of strings."""
    paths = [value] if key == "working_dir" else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return None
    return paths


def _did_you_mean(name: str, known: Any) -> str:
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
