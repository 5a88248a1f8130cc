"""What a replica imported as it started, for its fork server to import too.

A deployment's constructor often imports a large installed package (``import sklearn``
inside ``__init__``). Its module was preloaded by the fork server, but not what the
constructor imports: every replica forked later (a scale-up, a redeploy, a replacement)
would import it again, ~2.5 s of CPU for scikit-learn. The worker reports the installed
modules its replica's start imported (:class:`ImportsDuring`); the runtime has the fork
server import them with the deployment's own modules (``zygote.Preload``) before it
forks the deployment's next replica. That replica waits for the import as it would have
for its own; the ones after it start with the modules already imported.

Only modules of installed packages (under ``sys.prefix``: the standard library and
site-packages) are reported, never the user's own files (the fork server re-imports an
edited user module; these never change while shoal runs) nor shoal's. Nothing is
reported when the replica's start started a thread other than shoal's and asyncio's
executor's: an import that starts a thread would end forking for the whole instance
(forking a process with threads is unsafe), and which import did cannot be told.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

from shoal._runtime.process.zygote import _RefuseForkUnsafe

#: At most this many module names per report (scikit-learn's start imports ~1,360, ~1,220
#: once their packages are left out; a name is ~30 bytes of a fork server message).
MAX_MODULES = 2000

#: Threads a replica's start may start that no import started: shoal's own (its log
#: files' writer, spans), and asyncio's executor (``run_in_executor``, ``to_thread``).
_NOT_FROM_IMPORTS = ("shoal-", "asyncio_", "ThreadPoolExecutor")

_INSTALLED = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix)})
_SHOAL = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..")) + os.sep


class ImportsDuring:
    """Records the modules imported from its creation to :meth:`stop` (a replica's start):
    a finder first in ``sys.meta_path`` that notes each name it is asked for and finds
    nothing, so the next finder imports it. Python asks finders only for modules not
    imported yet. Comparing ``sys.modules`` before and after would touch every module
    already there: reading an object (even through a set of names) writes its reference
    count, and in a forked worker that copies each page it shares with the fork server
    (~5 MB per replica once scikit-learn is preloaded: the demo's 51 processes went from
    686 to 947 MB PSS)."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._threads = set(threading.enumerate())
        sys.meta_path.insert(0, self)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        self._names.append(name)

    def stop(self) -> list[str]:
        """Stop recording. The installed modules imported meanwhile, in the order their
        imports began, but for the packages of others among them (importing ``a.b``
        imports ``a``); none if a thread an import may have started appeared."""
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        for thread in threading.enumerate():
            if thread not in self._threads and not thread.name.startswith(_NOT_FROM_IMPORTS):
                return []
        imported = [
            name
            for name in dict.fromkeys(self._names)  # a failed import may be tried again
            if (module := sys.modules.get(name)) is not None and _installed(name, module)
        ]
        packages: set[str] = set()
        for name in imported:
            parts = name.split(".")
            packages.update(".".join(parts[:end]) for end in range(1, len(parts)))
        return [name for name in imported if name not in packages][:MAX_MODULES]


def _installed(name: str, module: Any) -> bool:
    if name.partition(".")[0] in _RefuseForkUnsafe.PACKAGES or name == "__main__":
        return False
    path = getattr(module, "__file__", None)
    if not path:  # built in, a namespace package: nothing to read, or a package's parts
        return False
    real = os.path.realpath(path)
    return real.startswith(_INSTALLED) and not real.startswith(_SHOAL)
