"""Options are validated when declared, with errors that name the option and the value."""

from __future__ import annotations

import pytest

import shoal
from shoal import serve


def test_public_names_are_pinned() -> None:
    expected = {
        "Application", "ApplicationStatus", "AutoscalingConfig", "BatchSizeMismatchError",
        "ConfigError", "Deployment",
        "DeploymentConfig", "DeploymentError", "DeploymentHandle", "DeploymentResponse",
        "DeploymentResponseGenerator", "DeploymentStatus", "HTTPOptions", "NotFoundError",
        "NotRunningError", "ReplicaContext", "ReplicaDiedError", "ReplicaError", "ReplicaState",
        "RequestCancelledError", "RequestContext", "RequestTimeoutError", "RouteConflictError",
        "RunTarget", "ShoalError", "TransportError", "UnavailableError", "batch", "delete",
        "deployment",
        "get_app_handle", "get_deployment_handle", "get_replica_context", "get_request_context",
        "get_multiplexed_model_id", "ingress", "multiplexed",
        "run", "run_many", "serve", "shutdown", "start", "status",
    }  # fmt: skip
    assert set(shoal.__all__) == expected
    assert set(serve.__all__) == expected - {"serve"}
    for name in serve.__all__:
        assert getattr(serve, name) is getattr(shoal, name)


def test_every_shoal_error_is_a_shoal_error() -> None:
    for name in shoal.__all__:
        value = getattr(shoal, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, shoal.ShoalError)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"num_replicas": -1}, "num_replicas=-1"),
        ({"max_ongoing_requests": 0}, "max_ongoing_requests=0"),
        ({"health_check_period_s": -5}, "health_check_period_s=-5"),
        ({"ray_actor_options": {"num_cpus": -1}}, "ray_actor_options.num_cpus=-1"),
        ({"ray_actor_options": {"nmu_gpus": 1}}, "unknown option 'ray_actor_options.nmu_gpus'"),
        ({"user_config": {"f": object()}}, "user_config"),
        ({"num_replica": 2}, "unknown option 'num_replica'"),
        ({"autoscaling_config": {"min_replicas": 5, "max_replicas": 2}}, "min_replicas (5)"),
        ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}, "mutually exclusive"),
    ],
)
def test_invalid_options_fail_at_decoration(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(serve.ConfigError) as info:
        serve.deployment(**options)(lambda: None)
    assert fragment in str(info.value)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(serve.ConfigError, match=r"valid options: .*max_ongoing_requests"):
        serve.deployment(max_concurrent=3)(lambda: None)


def test_options_returns_a_modified_copy() -> None:
    @serve.deployment(num_replicas=2, user_config={"a": 1})
    class Model:
        pass

    changed = Model.options(name="Other", max_ongoing_requests=9)
    assert (changed.name, changed.max_ongoing_requests, changed.num_replicas) == ("Other", 9, 2)
    assert (Model.name, Model.max_ongoing_requests) == ("Model", 5)
    with pytest.raises(serve.ConfigError, match="num_replicas='many'"):
        Model.options(num_replicas="many")


def test_defaults_match_ray_serve() -> None:
    config = serve.deployment(lambda: None).config
    assert config.max_ongoing_requests == 5
    assert config.ray_actor_options.num_cpus == 0  # a replica does not reserve a whole CPU
    assert config.target_replicas() == 1
    autoscaled = serve.DeploymentConfig(
        autoscaling_config={"min_replicas": 2, "max_replicas": 4}, num_replicas="auto"
    )
    assert autoscaled.target_replicas() == 2  # starts at min_replicas, as in Ray Serve


def test_http_options_are_validated() -> None:
    with pytest.raises(serve.ConfigError, match="port=70000"):
        serve.start(http_options={"port": 70000})
    with pytest.raises(serve.ConfigError, match="unknown option 'hots'"):
        serve.start(http_options={"hots": "0.0.0.0"})
    assert serve.HTTPOptions().host == "127.0.0.1"


def test_deployments_cannot_be_called_directly_and_functions_take_no_args() -> None:
    @serve.deployment
    def fn() -> int:
        return 1

    with pytest.raises(serve.ShoalError, match=r"\.bind"):
        fn()
    with pytest.raises(serve.ConfigError, match="no constructor arguments"):
        fn.bind(1)
    with pytest.raises(serve.ConfigError, match=r"Deployment\.bind"):
        serve.run(fn)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["/y/", "y", "models/"])
def test_route_prefix_must_start_and_not_end_with_a_slash(prefix: str) -> None:
    @serve.deployment
    def fn() -> int:
        return 1

    # Ray Serve's message, naming the value.
    with pytest.raises(serve.ConfigError, match=f"Invalid route_prefix {prefix!r}"):
        serve.run(fn.bind(), route_prefix=prefix, _local_testing_mode=True)
