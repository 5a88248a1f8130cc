"""Ray Serve behaviours that programs rely on, written from Ray's documentation."""

from __future__ import annotations

from conftest import Deploy

from shoal import serve


@serve.deployment
class Greeter:
    def __call__(self, name: str) -> str:
        return f"hello {name}"

    def shout(self, name: str) -> str:
        return f"HELLO {name}"


def test_handle_options_chains_compare_equal(deploy: Deploy) -> None:
    handle = deploy(Greeter.bind())
    assert handle.options(method_name="shout") == handle.shout
    assert hash(handle.options(method_name="shout")) == hash(handle.shout)
    assert handle.options(stream=False) == handle
    assert handle.shout != handle
    assert len({handle.shout, handle.options(method_name="shout"), handle}) == 2
    assert handle.shout.remote("ann").result() == "HELLO ann"
