"""Deploys that ``serve.run_many`` does not wait for (``wait_for_applications_running=False``)."""

from __future__ import annotations

import logging
from concurrent.futures import Future

from shoal._seam.specs import AppSpec

logger = logging.getLogger("shoal")


def logged_failure(future: Future[None], specs: list[AppSpec]) -> Future[None]:
    """``future`` (the deploy of ``specs``), whose failure, if any, is logged when it ends:
    nobody else may ever look at it."""
    names = ", ".join(repr(spec.name) for spec in specs)

    def ended(done: Future[None]) -> None:
        error = None if done.cancelled() else done.exception()
        if error is not None:
            logger.error("deploying %s (not waited for) failed: %s", names, error)

    future.add_done_callback(ended)
    return future
