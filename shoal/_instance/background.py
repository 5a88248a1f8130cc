"""Operations that ``serve.*`` does not wait for: ``serve.run_many(...,
wait_for_applications_running=False)``'s deploy, ``serve.delete(name, _blocking=False)``."""

from __future__ import annotations

import logging
from concurrent.futures import Future

from shoal._seam.specs import AppSpec

logger = logging.getLogger("shoal")


def deploying(specs: list[AppSpec]) -> str:
    """What a deploy of ``specs`` is called in a log line."""
    return "deploying " + ", ".join(repr(spec.name) for spec in specs)


def logged_failure(future: Future[None], what: str) -> Future[None]:
    """``future`` (of the operation ``what``), whose failure, if any, is logged when it
    ends: nobody else may ever look at it."""

    def ended(done: Future[None]) -> None:
        error = None if done.cancelled() else done.exception()
        if error is not None:
            logger.error("%s (not waited for) failed: %s", what, error)

    future.add_done_callback(ended)
    return future
