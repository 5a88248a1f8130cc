"""shoal: serve machine-learning models and business logic as composable Python deployments.

``from shoal import serve`` and ``import shoal`` expose the same names, which
follow Ray Serve's public API. The list lives in :mod:`shoal.serve`.
"""

from shoal import serve
from shoal.serve import *  # noqa: F403 - the public names, listed once in shoal.serve

__version__ = "0.1.0"

__all__ = ["serve", *serve.__all__]
