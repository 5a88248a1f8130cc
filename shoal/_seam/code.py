"""The user's code of a deployment: its class or function and constructor arguments.

In the process that bound the application they are live objects. Pickled (to
reach a replica, or a ``shoal start`` server from another driver) they travel as
one cloudpickled blob, together with the ``sys.path`` and working directory of
the process that built them; only :meth:`UserCode.load` unpickles the blob, after
:meth:`UserCode.prepare_imports` made the user's modules importable. So a
controller can hold, checkpoint and forward an application without ever
importing the user's modules.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import re
import sys
import types
from typing import Any


class UserCode:
    """A deployment's ``(target, init_args, init_kwargs)``, live or as a blob."""

    __slots__ = ("_blob", "_imports", "_live", "cwd", "sys_path")

    def __init__(
        self,
        target: Any,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
        sys_path: list[str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self._live: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = (
            target,
            init_args,
            init_kwargs,
        )
        self._blob: bytes | None = None
        self._imports: list[str] | None = None
        self.sys_path = list(sys.path) if sys_path is None else sys_path
        self.cwd = os.getcwd() if cwd is None else cwd

    @classmethod
    def from_blob(cls, blob: bytes, sys_path: list[str], cwd: str) -> UserCode:
        code = cls.__new__(cls)
        code._live, code._blob, code.sys_path, code.cwd = None, blob, sys_path, cwd
        code._imports = None
        return code

    def blob(self) -> bytes:
        """The cloudpickled objects (made once). Raises what cloudpickle raises."""
        if self._blob is None:
            import cloudpickle

            self._blob = cloudpickle.dumps(self._live)
        return self._blob

    def __reduce__(self) -> tuple[Any, ...]:
        return (UserCode.from_blob, (self.blob(), self.sys_path, self.cwd))

    def imports(self) -> list[str]:
        """The modules that loading this code imports (those the blob refers to), without
        loading it: a process can import them ahead (the fork server does, once for all
        the replicas it forks)."""
        if self._imports is None:
            self._imports = referenced_modules(self.blob())
        return self._imports

    def prepare_imports(self, runtime_env: dict[str, Any] | None = None) -> None:
        """Make this process import as the building one did: its sys.path and cwd, with
        ``runtime_env``'s local paths first (see :meth:`import_path`)."""
        path, cwd = self.import_path(runtime_env)
        sys.path[:] = path
        # On a Ray node of another machine, the building process's directory is not
        # there: Ray has already made the runtime_env's working_dir the cwd.
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)

    def import_path(self, runtime_env: dict[str, Any] | None = None) -> tuple[list[str], str]:
        """The ``sys.path`` and cwd the user's code imports with.

        ``working_dir`` becomes the cwd and the first sys.path entry; a ``py_modules``
        directory or ``.py`` file is importable by its name (its parent goes on
        sys.path, as Ray makes the module importable); a ``.zip``/``.whl`` goes on
        sys.path itself. Relative paths are relative to the building process's cwd.
        """
        env = runtime_env or {}
        cwd, front = self.cwd, []
        working_dir = env.get("working_dir")
        if working_dir is not None and "://" not in working_dir:  # a URI: Ray fetched it
            cwd = os.path.join(self.cwd, working_dir)
            front.append(cwd)
        for module in env.get("py_modules", []):
            if "://" in module:
                continue
            path = os.path.join(self.cwd, module)
            zipped = os.path.isfile(path) and path.endswith((".zip", ".whl"))
            front.append(path if zipped else os.path.dirname(path.rstrip(os.sep)))
        return [os.path.abspath(p) for p in front] + self.sys_path, cwd

    def load(self) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """The live ``(target, init_args, init_kwargs)``, unpickling the blob if needed."""
        if self._live is None:
            assert self._blob is not None
            self._live = _SourceUnpickler(io.BytesIO(self._blob)).load()
        return self._live

    def fingerprint(self) -> str | None:
        """A hash of the code and arguments, equal in every process that builds the same
        application from the same files; None if it cannot be computed (then the code
        can never be compared).

        The objects are pickled by :func:`_canonical_dumps`: cloudpickle's pickle itself
        differs in each process (class tracker ids; sets, in an order that follows the
        hash seed, and what FastAPI derives from it; memory addresses in pydantic's
        schemas). The source of the
        target's module counts too: helpers it uses are pickled by reference, so an
        edit of the module would otherwise go unseen.
        """
        try:
            target, args, kwargs = self.load()
            blob = _canonical_dumps((target, args, kwargs))
        except Exception:
            return None
        digest = hashlib.blake2b(blob, digest_size=12)
        module = sys.modules.get(getattr(target, "__module__", "") or "")
        path = getattr(module, "__file__", None)
        source = _read(path) if isinstance(path, str) else None
        if source is not None:
            digest.update(source)
        return digest.hexdigest()


def _canonical_dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj)`` made the same in every process that builds ``obj`` from
    the same code and data. For comparing only: it is not what replicas receive.

    * The items of a set or frozenset are pickled sorted: their iteration order follows
      their hashes, which for strings change with each process's hash seed.
    * cloudpickle's class tracker ids (random) are renumbered in order of appearance.
    * So are the ids (memory addresses) of objects that this pickle holds, written in
      strings as ``:<decimal>`` or ``0x<hex>``: pydantic names the types of its core
      schemas so (``module.Model:140234…``), kept in its validators and TypeAdapters.
      Only ids of objects pickled here: their content counts instead.
    * Attributes that an object derives from its others are left out (``_DERIVED``).
    """
    import cloudpickle

    file = io.BytesIO()
    pickler = _canonical_pickler()(file, protocol=cloudpickle.DEFAULT_PROTOCOL)
    pickler.dump(obj)
    return _without_object_ids(_without_class_ids(file.getvalue()), pickler.ids)


@functools.cache
def _canonical_pickler() -> type[Any]:
    import cloudpickle

    class CanonicalPickler(cloudpickle.Pickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ids: set[int] = set()

        # The C pickler writes a set itself, without asking reducer_override or the
        # dispatch_table; persistent_id it asks first, for every object it saves.
        def persistent_id(self, obj: Any) -> Any:
            self.ids.add(id(obj))
            kind = type(obj)
            if kind is set or kind is frozenset:
                return kind.__name__, _sorted_items(obj)
            return None

        def reducer_override(self, obj: Any) -> Any:
            derived = _derived_attributes(obj)
            attributes = getattr(obj, "__dict__", None)
            if derived and isinstance(attributes, dict):
                state = {k: v for k, v in attributes.items() if k not in derived}
                return _new, (type(obj),), state
            return super().reducer_override(obj)

    return CanonicalPickler


#: Attributes that a class computes from its others, and which may differ between
#: processes: left out of a canonical pickle, as the others decide them. FastAPI's route
#: names itself (``unique_id``) after ``list(methods)[0]``, an element of a set, and
#: names the models of its body and response fields after that.
_DERIVED: dict[tuple[str, str], frozenset[str]] = {
    ("fastapi.routing", "APIRoute"): frozenset({
        "unique_id", "body_field", "response_field", "response_fields", "stream_item_field",
        "secure_cloned_response_field", "dependant", "_flat_dependant", "_embed_body_fields",
        "app", "path_regex", "param_convertors",
    }),
}  # fmt: skip


def _new(cls: type[Any]) -> Any:
    return object.__new__(cls)


def _derived_attributes(obj: Any) -> frozenset[str]:
    for (module_name, class_name), names in _DERIVED.items():
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(obj, cls):
            return names
    return frozenset()


def _sorted_items(items: set[Any] | frozenset[Any]) -> list[Any]:
    """``items`` sorted: by value if all are str, bytes or int (of one of these types
    exactly), else by their own canonical pickle (other types may have no order, or a
    partial one, as sets have)."""
    kinds = {type(item) for item in items}
    if len(kinds) <= 1 and kinds <= {str, bytes, int}:
        return sorted(items)
    return sorted(items, key=_canonical_dumps)


_OBJECT_ID = re.compile(rb"(?<=:)(?:str-)?([0-9]{4,20})|0x([0-9a-f]{4,16})")


def _without_object_ids(blob: bytes, ids: set[int]) -> bytes:
    """``blob`` with the numbers in ``ids`` (see :func:`_canonical_dumps`) renumbered 0, 1,
    2... in order of appearance, each keeping its width (so the pickle's lengths hold)."""
    order: dict[int, int] = {}

    def renumber(match: re.Match[bytes]) -> bytes:
        decimal, hexadecimal = match.group(1), match.group(2)
        digits = decimal if decimal is not None else hexadecimal
        value = int(digits, 10 if decimal is not None else 16)
        if value not in ids:
            return match.group(0)
        number = order.setdefault(value, len(order))
        start = match.start(1 if decimal is not None else 2) - match.start()
        return match.group(0)[:start] + b"%0*d" % (len(digits), number)

    return _OBJECT_ID.sub(renumber, blob)


_CLASS_ID = re.compile(rb"\x8c\x20([0-9a-f]{32})")  # SHORT_BINUNICODE of a uuid4().hex


def _without_class_ids(blob: bytes) -> bytes:
    """``blob`` with cloudpickle's per-process class tracker ids renumbered 0, 1, 2..."""
    try:
        from cloudpickle import cloudpickle as internals

        known = {str(v) for v in internals._DYNAMIC_CLASS_TRACKER_BY_CLASS.values()}
    except AttributeError:  # another cloudpickle: compare as is (a change is then seen)
        return blob
    order: dict[bytes, int] = {}

    def renumber(match: re.Match[bytes]) -> bytes:
        if match.group(1).decode() not in known:
            return match.group(0)  # user data that looks like an id
        return b"\x8c\x20" + b"%032d" % order.setdefault(match.group(1), len(order))

    return _CLASS_ID.sub(renumber, blob)


#: Opcodes that push a string (the operands of STACK_GLOBAL are two of them, or memo gets).
_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                      "BINSTRING", "SHORT_BINSTRING"})  # fmt: skip
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NOT_PUSHING = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"})
_NOT_IMPORTED = frozenset({"__main__", "__mp_main__", "builtins", "copyreg"})


def referenced_modules(blob: bytes) -> list[str]:
    """The modules unpickling ``blob`` imports: those of its globals (classes and
    functions pickled by reference) and of the modules cloudpickle sends by name
    (``subimport``), in order of appearance. Read off the opcodes; nothing is loaded."""
    import pickletools

    found: dict[str, None] = {}
    # What each pushing opcode pushed: a string, a global (module, name), or something else.
    pushed: list[str | tuple[str, str] | None] = []
    memo: dict[int, str | tuple[str, str] | None] = {}
    subimport = False  # cloudpickle's subimport was pushed: the next string names a module
    for opcode, arg, _ in pickletools.genops(blob):
        name = opcode.name
        if name in _NOT_PUSHING:
            if name != "STOP" and name not in ("PROTO", "FRAME"):
                memo[len(memo) if name == "MEMOIZE" else int(str(arg))] = (
                    pushed[-1] if pushed else None
                )
            continue
        value: str | tuple[str, str] | None = None
        if name == "GLOBAL":
            module, _, attribute = str(arg).partition(" ")
            value = (module, attribute)
        elif name == "STACK_GLOBAL":  # its operands: the two strings pushed just before
            module, attribute = str(pushed[-2]), str(pushed[-1])
            value = (module, attribute)
        elif name in _STRINGS:
            value = str(arg)
        elif name in _MEMO_GETS:
            value = memo.get(int(str(arg)))
        if isinstance(value, tuple):
            if value[0] not in _NOT_IMPORTED:
                found[value[0]] = None
            subimport = value[1] in ("subimport", "dynamic_subimport")
        elif isinstance(value, str) and subimport:
            found[value] = None
            subimport = False
        pushed.append(value)
    return list(found)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


class _SourceUnpickler(pickle.Unpickler):
    """Unpickles user code, giving code sent by value its source file back.

    cloudpickle sends the code of classes and functions it cannot pickle by
    reference (those of the driver's ``__main__``, or defined inside a function)
    with the file name ``<dynamic-code>``, so tracebacks and logs would show no
    file, line text or source. Such a function still carries its module's
    ``__file__``: its code is renamed back to that file.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module == "cloudpickle.cloudpickle" and name == "_make_function":
            return _with_source_file(found)
        return found


_DYNAMIC_CODE = "<dynamic-code>"


def _with_source_file(make_function: Any) -> Any:
    def make(code: types.CodeType, globals_: dict[str, Any], *args: Any) -> Any:
        path = globals_.get("__file__")
        if code.co_filename == _DYNAMIC_CODE and isinstance(path, str):
            code = _renamed(code, path)
        return make_function(code, globals_, *args)

    return make


def _renamed(code: types.CodeType, path: str) -> types.CodeType:
    """``code`` and the code nested in it (inner functions, comprehensions) with ``path``."""
    consts = tuple(
        _renamed(c, path) if isinstance(c, types.CodeType) and c.co_filename == _DYNAMIC_CODE else c
        for c in code.co_consts
    )
    return code.replace(co_filename=path, co_consts=consts)
