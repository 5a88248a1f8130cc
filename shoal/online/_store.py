"""WeightStore: numbered generations of model weights in a directory, the source of truth.

Layout of the directory (created on the first ``save``)::

    gen-00000001.pkl ... gen-0000000N.pkl   the kept generations (cloudpickle)
    LATEST                                  the newest complete generation, as text
    .lock                                   held (``fcntl.flock``) while numbering

Guarantees:

* a generation file is complete or absent: it is written to a temporary file,
  fsynced, then renamed into place (``os.replace``), and only then does ``LATEST``
  (written the same way) name it. A writer killed half-way leaves at most a
  stray temporary file (removed by a later ``save``), never a partial generation;
* generation numbers increase strictly, even with several writer processes (on
  one host, or on a shared filesystem whose ``flock`` is honoured): numbering and
  renaming happen under an exclusive lock on ``.lock``;
* readers take no lock: they read ``LATEST``, then that generation's file.

The files are unpickled when loaded: a store directory must be as trusted as code.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from shoal._errors import GenerationNotFoundError

_GENERATION_FILE = re.compile(r"^gen-(\d{8,})\.pkl$")
_LATEST = "LATEST"
_LOCK = ".lock"
_LOAD_ATTEMPTS = 5
_STALE_TEMP_S = 3600.0


class WeightStore:
    """A directory of numbered weight generations; see the module docstring for guarantees.

    ``keep`` is how many of the newest generations ``save`` keeps (at least 1).
    Constructing a store touches nothing on disk, so it can be built at import
    time and passed to deployments; it pickles as its path and ``keep``.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep: int = 5) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.path = Path(path)
        self.keep = keep

    def __repr__(self) -> str:
        return f"WeightStore({str(self.path)!r}, keep={self.keep})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (str(self.path), self.keep))

    # --- writing ---------------------------------------------------------------------

    def save(self, weights: Any) -> int:
        """Persist ``weights`` as the next generation; returns its number (1 for the first).

        ``weights`` is serialized before the lock is taken, so it must not be
        mutated by another thread while ``save`` runs.
        """
        payload = cloudpickle.dumps(weights, protocol=5)
        self.path.mkdir(parents=True, exist_ok=True)
        with self._locked():
            generation = max(self._read_latest(), self._newest_file()) + 1
            _write_atomically(self.path / _file_name(generation), payload)
            _write_atomically(self.path / _LATEST, f"{generation}\n".encode())
            _fsync_directory(self.path)
            self._prune(generation)
        return generation

    def _prune(self, newest: int) -> None:
        for generation in self.generations():
            if generation <= newest - self.keep:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / _file_name(generation)).unlink()
        # Temporary files of writers that died mid-write; a live writer's is seconds old.
        stale = time.time() - _STALE_TEMP_S
        for temp in self.path.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if temp.stat().st_mtime < stale:
                    temp.unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A separate lock file: the data files are replaced, and a lock on a
        # replaced inode would not exclude anyone.
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # --- reading ---------------------------------------------------------------------

    def latest_generation(self) -> int:
        """The newest complete generation, or 0 if nothing was saved yet."""
        return self._read_latest()

    def generations(self) -> list[int]:
        """The generations kept on disk, oldest first."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        found = (_GENERATION_FILE.match(name) for name in names)
        return sorted(int(match.group(1)) for match in found if match)

    def load(self, generation: int | None = None) -> tuple[int, Any]:
        """``(generation, weights)``: the given generation, or the latest one.

        Raises :class:`GenerationNotFoundError` if the store is empty or that
        generation is not kept.
        """
        if generation is not None:
            return generation, self._load_file(generation)
        for _ in range(_LOAD_ATTEMPTS):
            latest = self._read_latest()
            if latest == 0:
                raise GenerationNotFoundError(f"no weights saved in {self.path} yet")
            try:
                return latest, self._load_file(latest)
            except GenerationNotFoundError:
                continue  # pruned between reading LATEST and opening it: read LATEST again
        raise GenerationNotFoundError(f"{self.path}: LATEST names a generation that is missing")

    def _load_file(self, generation: int) -> Any:
        try:
            payload = (self.path / _file_name(generation)).read_bytes()
        except FileNotFoundError:
            kept = self.generations()
            raise GenerationNotFoundError(
                f"generation {generation} is not in {self.path} (kept: {kept or 'none'})"
            ) from None
        return cloudpickle.loads(payload)

    def _read_latest(self) -> int:
        try:
            text = (self.path / _LATEST).read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text else 0

    def _newest_file(self) -> int:
        kept = self.generations()
        return kept[-1] if kept else 0


def _rebuild(path: str, keep: int) -> WeightStore:
    return WeightStore(path, keep=keep)


def _file_name(generation: int) -> str:
    return f"gen-{generation:08d}.pkl"


def _write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that readers see the old file or the new, never a mix."""
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _fsync_directory(path: Path) -> None:
    """Make the renames durable: a crash after ``save`` returns cannot undo them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
