"""A restarted server's recovery (shoal._controller.recovery), in process on the simulated
runtime: a restored application whose replica cannot be placed does not keep the server
from serving."""

from __future__ import annotations

import asyncio
import time

from bench import scale
from shoal import serve
from shoal._api.graph import build_app
from shoal._controller.recovery import restore
from shoal._controller.status import ApplicationStatus
from shoal._proxy.listener import port_held
from shoal._runtime.process.adopt import QUIET_S, Rejoined
from shoal._transport.messages import Rejoin
from shoal._transport.tcp import listen_tcp


@serve.deployment(ray_actor_options={"num_cpus": 1000})
class TooBig:
    """Fits no node of the simulated cluster (64 CPUs each): PENDING for good."""

    def __call__(self) -> str:
        return "never"


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Fits:
    def __call__(self) -> str:
        return "served"


def test_restore_returns_while_an_application_waits_for_resources() -> None:
    async def scenario() -> None:
        controller, _ = await scale.start(nodes=2)
        stuck = build_app(TooBig.bind(), "stuck", "/stuck", None)
        fine = build_app(Fits.bind(), "fine", "/fine", None)
        started = time.monotonic()
        await asyncio.wait_for(restore(controller, [stuck, fine], wait_s=0.5), 10)
        assert time.monotonic() - started < 5
        status = controller.status().applications
        assert status["fine"].status == ApplicationStatus.RUNNING
        assert status["stuck"].status == ApplicationStatus.DEPLOYING
        # The deploy goes on in the background: deleting the application ends it.
        await asyncio.wait_for(controller.delete("stuck"), 10)
        assert "stuck" not in controller.status().applications
        await controller.shutdown(5.0)

    scale.run(scenario())


def test_a_restarted_controller_waits_for_the_proxy_that_holds_its_port() -> None:
    """A proxy that rejoins after the quiet time (its loop busy serving requests) is still
    waited for while it holds the HTTP port, within the adoption window; with no proxy
    expected, the quiet time after the last rejoin ends the wait."""

    async def main() -> None:
        rejoined = Rejoined()
        rejoined.listening()

        def proxy_rejoins() -> None:
            rejoined.proxy = (object(), Rejoin("proxy-1", 1, proxy=("127.0.0.1", 1)))
            rejoined.add()

        asyncio.get_running_loop().call_later(QUIET_S * 3, proxy_rejoins)
        started = time.monotonic()
        await rejoined.settle(10.0)
        await rejoined.wait_for_proxy(started + 10.0)
        assert rejoined.proxy is not None, "settled before the proxy rejoined"
        assert time.monotonic() - started < 10.0

        nobody = Rejoined()
        nobody.listening()
        started = time.monotonic()
        await nobody.settle(10.0)
        assert time.monotonic() - started < 5.0  # the quiet time, not the window

    asyncio.run(main())


def test_port_held_sees_a_listening_socket() -> None:
    listener = listen_tcp("127.0.0.1", 0, 8)
    port = listener.getsockname()[1]
    assert port_held("127.0.0.1", port)
    listener.close()
    assert not port_held("127.0.0.1", port)
    assert not port_held("127.0.0.1", 0)
