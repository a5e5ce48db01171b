"""How functions, arguments, results and exceptions become frames and back.

* cloudpickle, protocol 5: lambdas, closures and functions defined in the program's
  ``if __name__ == "__main__":`` block travel by value.
* A function or class defined at the top level of the program travels *by reference*:
  every worker imported the program, so it already has it. By-value pickling would also
  ship the globals it reads, defeating the "Large datasets" advice of the SCOOP docs
  (a module-level dataset is loaded once per worker, not sent with every task). Which
  names are top-level is read from the program's syntax tree (:func:`main_exports`).
* Buffers of at least ``OOB_MIN`` bytes (numpy arrays, bytearrays, PickleBuffer) leave
  the pickle and travel as frames of their own, without a copy on the sending side.
* A task's exception keeps its type; the worker-side traceback rides along as its
  ``__cause__`` (a :class:`RemoteTraceback`), like CPython's ProcessPoolExecutor. An
  exception that cannot be pickled arrives as a :class:`RemoteError` with the same text.
"""

from __future__ import annotations

import ast
import io
import pickle
import sys
import traceback
import types

import cloudpickle

from ._errors import RemoteError, RemoteTraceback, SerializationError

# Buffers smaller than this stay inside the pickle: a frame of its own costs more
# (bookkeeping per frame) than copying a few kilobytes.
OOB_MIN = 64 * 1024

# Names defined at the top level of the program run as __main__ (outside its guarded
# block); set by the root worker before it runs the program.
_main_exports: frozenset[str] = frozenset()


def set_main_exports(names: frozenset[str]) -> None:
    """Declare which ``__main__`` names every worker has (called by the root bootstrap)."""
    global _main_exports
    _main_exports = frozenset(names)


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    has_name = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
    has_main = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
    return has_name and has_main


def main_exports(source: str) -> frozenset[str]:
    """Top-level function and class names of a program that exist when it is imported.

    Names defined only inside ``if __name__ == "__main__":`` are left out: workers import
    the program under another name and never run that block.
    """
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.If):
                if not _is_main_guard(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.For, ast.While, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(source).body)
    return frozenset(names)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that importable ``__main__`` names go by reference."""

    def reducer_override(self, obj):
        if (_main_exports and isinstance(obj, (types.FunctionType, type))
                and getattr(obj, "__module__", None) == "__main__"):
            qualname = getattr(obj, "__qualname__", "")
            if qualname.split(".", 1)[0] in _main_exports and "<" not in qualname:
                target = sys.modules.get("__main__")
                for part in qualname.split("."):
                    target = getattr(target, part, None)
                if target is obj:
                    return NotImplemented  # plain pickle: a reference to __main__.<name>
        return super().reducer_override(obj)


def dumps(obj) -> list:
    """Pickle ``obj`` into frames: the pickle, then its large out-of-band buffers."""
    buffers: list = []

    def keep_out_of_band(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < OOB_MIN:
            return True  # in band
        buffers.append(raw)
        return False

    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    return [out.getbuffer(), *buffers]


def _view(frame):
    b = getattr(frame, "buffer", None)
    return frame if b is None else b


def loads(frames):
    """Unpickle frames made by :func:`dumps` (authenticate them first)."""
    # Out-of-band buffers are copied once so that arrays built on them are writable, as
    # they would be after a plain pickle round trip.
    buffers = [bytearray(_view(f)) for f in frames[1:]]
    return pickle.loads(_view(frames[0]), buffers=buffers)


def describe_unpicklable(func, args, kwargs) -> str:
    """Name the first part of a call that cannot be pickled, for an actionable error."""
    name = getattr(func, "__qualname__", None) or repr(func)
    parts = [("the function", func)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in parts:
        try:
            dumps(value)
        except Exception as exc:  # noqa: BLE001 - any pickling failure is reported
            return (f"cannot send a call to {name}() to another worker: {label} "
                    f"({type(value).__name__}) cannot be pickled: {exc}")
    return f"cannot send a call to {name}() to another worker: it cannot be pickled"


# -- exceptions -------------------------------------------------------------------------

def format_remote(exc: BaseException, where: str, skip_frames: int = 1) -> str:
    """The worker-side traceback of ``exc`` as text, headed by where it ran."""
    tb = exc.__traceback__
    for _ in range(skip_frames):  # drop scoop's own runner frames
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return f'\n"""\nTraceback from {where}:\n{text}"""'


def attach_traceback(exc: BaseException, where: str) -> BaseException:
    """Give a task's exception that ran in its owner's process the same ``__cause__`` as a
    remote one, so ``exc.__cause__`` always tells where it ran (a user's own ``raise ...
    from`` cause is kept)."""
    if exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(format_remote(exc, where).replace(
            "Traceback from ", "Traceback from (local) ", 1))
    return exc


class _ExceptionWithTraceback:
    """Wire form of a task's exception: the exception plus its traceback text."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self):
        return rebuild_exception, (self.exc, self.tb)


def rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def wire_exception(exc: BaseException, where: str):
    """Make a task's exception ready to pickle, falling back to RemoteError if needed."""
    tb = format_remote(exc, where)
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    try:
        dumps(exc)
        return _ExceptionWithTraceback(exc, tb)
    except Exception:  # noqa: BLE001 - the exception itself cannot travel
        return _ExceptionWithTraceback(RemoteError(type(exc).__qualname__, str(exc), tb), tb)


def unpicklable_result_error(value, exc: BaseException) -> SerializationError:
    return SerializationError(
        f"the task's result ({type(value).__name__}) cannot be pickled to send it back: {exc}")
