"""Errors raised by the pattern building blocks; all are :class:`shoal.ShoalError` subclasses.

They are defined in :mod:`shoal._errors` with every other shoal error and
re-exported here. They cross process boundaries like any exception raised in
a replica: the caller of ``await handle.remote(...)`` gets the same type, with
its attributes.
"""

from __future__ import annotations

from shoal._errors import FeedbackError, PatternError, QuorumError, SelectionError

__all__ = ["FeedbackError", "PatternError", "QuorumError", "SelectionError"]
