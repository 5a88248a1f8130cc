"""``from shoal.serve.exceptions import ...``: Ray Serve's ``ray.serve.exceptions``.

Every shoal error class, Ray Serve's names among them; the list is the one in
:mod:`shoal._errors`, so a class added there appears here too.
"""

from shoal import _errors
from shoal._errors import *  # noqa: F403 - the list lives in shoal._errors

__all__ = [*_errors.__all__]
