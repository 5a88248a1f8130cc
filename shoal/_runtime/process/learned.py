"""What a replica imported as it started, for its fork server to import too.

A deployment's constructor often imports a large installed package (``import sklearn``
inside ``__init__``). Its module was preloaded by the fork server, but not what the
constructor imports: every replica forked later (a scale-up, a redeploy, a replacement)
would import it again, ~2.5 s of CPU for scikit-learn. The worker reports the installed
modules its replica's start imported (:func:`imported_since`); the runtime has the fork
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


class ModulesBefore:
    """``sys.modules`` and the live threads when a replica's start began."""

    def __init__(self) -> None:
        self.modules = set(sys.modules)
        self.threads = set(threading.enumerate())


def imported_since(before: ModulesBefore) -> list[str]:
    """The installed modules imported since ``before``, in the order they were imported,
    but for the packages of others among them (importing ``a.b`` imports ``a``); none if
    a thread an import may have started appeared meanwhile."""
    for thread in threading.enumerate():
        if thread not in before.threads and not thread.name.startswith(_NOT_FROM_IMPORTS):
            return []
    imported = [
        name
        for name, module in list(sys.modules.items())
        if name not in before.modules and _installed(name, module)
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
