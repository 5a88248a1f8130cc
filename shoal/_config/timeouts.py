"""The time limits of an instance (:class:`Timeouts`), in one place: every wait on
another process, thread or user code has one, and a test may shorten them."""

from __future__ import annotations

from pydantic import Field

from shoal._config.strict import _Strict


class Timeouts(_Strict):
    """The time limits of an instance's control plane, in one place."""

    deploy_s: float = Field(600.0, gt=0)  # serve.run: every replica ready (PENDING included)
    shutdown_s: float = Field(30.0, gt=0)  # applications drained at shutdown
    # A restarted server serves after this even if some application is not running yet.
    restore_s: float = Field(30.0, gt=0)
    gpu_probe_s: float = Field(10.0, gt=0)  # nvidia-smi -L, once per instance
    build_s: float = Field(120.0, gt=0)  # importing and building a config file's applications
    admin_call_s: float = Field(30.0, gt=0)  # one call of an attached process to its instance
    server_start_s: float = Field(60.0, gt=0)  # `shoal start` until the server answers
    # A TCP peer proves the instance secret within this (shoal._transport.auth), else dropped.
    transport_handshake_s: float = Field(5.0, gt=0)
    # A control request to a worker process (configure it, start its proxy, its routes).
    control_call_s: float = Field(30.0, gt=0)
    # An update (replica set, routes) waits this long for each process's acknowledgement.
    update_ack_s: float = Field(1.0, gt=0)
    # Every proxy's (head and node proxies) event loop is pinged this often, and replaced
    # once it has not answered for proxy_check_timeout_s (a dead one is replaced at once).
    proxy_check_period_s: float = Field(1.0, gt=0)
    proxy_check_timeout_s: float = Field(5.0, gt=0)
    # Ray runtime: how often Ray's node table is read (nodes that joined or left), and how
    # long a restarted controller waits for the actors Ray lists by name to rejoin it.
    ray_nodes_poll_s: float = Field(2.0, gt=0)
    ray_rejoin_wait_s: float = Field(10.0, gt=0)
    # A new worker process says hello within this (its imports), else it is killed; a
    # replica's constructor returns within replica_start_s.
    worker_hello_s: float = Field(60.0, gt=0)
    replica_start_s: float = Field(600.0, gt=0)
    # The standby proxy process starts this long after the proxy serves: spawned at once
    # it would take a core from the first replicas, and an instance that lives less (a
    # test, a script) never needs one (a proxy that dies before is replaced by a new
    # process: about 1 s instead of 0.1 s). A restart whose standby does not serve within
    # standby_proxy_start_s uses a new process instead.
    standby_proxy_delay_s: float = Field(3.0, gt=0)
    standby_proxy_start_s: float = Field(2.0, gt=0)
    # The fork server (docs/operations.md): until it has imported shoal and can fork; one
    # fork; one deployment's imports. Past one, workers start with `python -m` instead.
    fork_server_ready_s: float = Field(60.0, gt=0)
    fork_spawn_s: float = Field(5.0, gt=0)
    fork_preload_s: float = Field(60.0, gt=0)

    # A worker told to exit (or killed) ends within this, else it is killed (and waited
    # for as long again); a stopping replica answers StopReplica after draining (its own
    # graceful_shutdown_timeout_s) and stop_reply_slack_s more, else it is killed.
    worker_exit_s: float = Field(3.0, gt=0)
    stop_reply_slack_s: float = Field(5.0, gt=0)
    # An orphaned worker waits at least this for a restarted controller to take it back.
    rejoin_answer_s: float = Field(2.0, gt=0)
    # A build child killed after build_s is seen gone within this (its files removed).
    build_kill_s: float = Field(5.0, gt=0)
    # An admin REST call (deploy, delete) answers 500 after this; the operation goes on.
    # A shutdown request waits shutdown_answer_s for a refusal before it answers.
    admin_op_s: float = Field(60.0, gt=0)
    shutdown_answer_s: float = Field(1.0, gt=0)
    # An ASGI ingress's lifespan startup or shutdown; a replica's reconfigure(user_config).
    asgi_lifespan_s: float = Field(60.0, gt=0)
    reconfigure_s: float = Field(60.0, gt=0)
    # A replica that missed health_check_timeout_s is pinged once more for this long
    # before it is killed (its loop may only have been slow).
    unresponsive_kill_s: float = Field(2.0, gt=0)
    # A user's autoscaling policy returns within this, else its decision is ignored.
    autoscaling_policy_s: float = Field(1.0, gt=0)
    # A new proxy waits this long for its route table before answering without one.
    proxy_routes_wait_s: float = Field(5.0, gt=0)
    # A replica's status_details() hook runs at most this (or a quarter of its health
    # check's timeout, when shorter: a slow hook never fails a health check).
    status_hook_s: float = Field(1.0, gt=0)
    # Ray runtime: where a rejoining actor is (asked of Ray by a restarted controller);
    # a node's proxy actor placed and started on its node.
    ray_adopt_lookup_s: float = Field(5.0, gt=0)
    ray_node_proxy_place_s: float = Field(30.0, gt=0)
    # The CLI: one admin call (above admin_op_s, so that the server's 500 comes first);
    # `shoal shutdown` until the instance has stopped.
    cli_call_s: float = Field(90.0, gt=0)
    cli_shutdown_wait_s: float = Field(60.0, gt=0)


TIMEOUTS = Timeouts()
