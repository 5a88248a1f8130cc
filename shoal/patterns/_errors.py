"""Errors raised by the pattern building blocks; all are :class:`shoal.ShoalError` subclasses.

They cross process boundaries like any exception raised in a replica: the
caller of ``await handle.remote(...)`` gets the same type, with its attributes.
"""

from __future__ import annotations

from shoal._errors import ShoalError


class PatternError(ShoalError):
    """Base class of the errors raised by ``shoal.patterns``."""


class QuorumError(PatternError):
    """Fewer ensemble members answered than ``min_responses`` requires.

    ``failed`` maps each member that was left out to why ("TimeoutError: ...",
    or the member's exception as "Type: message"); ``responded`` lists the
    members that answered. The message names both.
    """

    def __init__(
        self,
        message: str,
        failed: dict[str, str] | None = None,
        responded: list[str] | None = None,
    ) -> None:
        super().__init__(message)  # args == (message,): the error pickles and rebuilds as is
        self.failed = dict(failed or {})
        self.responded = list(responded or [])


class SelectionError(PatternError, LookupError):
    """A router could not pick a member: the choice names no member, or nothing chose one."""


class FeedbackError(PatternError, ValueError):
    """A bandit reward is invalid (rewards are finite numbers in [0, 1])."""


__all__ = ["FeedbackError", "PatternError", "QuorumError", "SelectionError"]
