"""Ray Serve behaviours that programs rely on, written from Ray's documentation."""

from __future__ import annotations

import pytest
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


def test_the_new_handle_api_is_accepted_and_the_old_one_refused_by_name(deploy: Deploy) -> None:
    handle = deploy(Greeter.bind())
    assert handle.options(use_new_handle_api=True).remote("ann").result() == "hello ann"
    with pytest.raises(serve.ConfigError, match=r"use_new_handle_api=False.*DeploymentHandle"):
        handle.options(use_new_handle_api=False)


def test_handle_options_refuse_values_of_another_type_by_name(deploy: Deploy) -> None:
    handle = deploy(Greeter.bind())
    with pytest.raises(serve.ConfigError, match=r"stream=\.\.\.\) takes True or False, got 'no'"):
        handle.options(stream="no")  # not converted to True
    with pytest.raises(serve.ConfigError, match=r"method_name=\.\.\.\) takes a method's name"):
        handle.options(method_name=3)
