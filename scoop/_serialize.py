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
* A list of tasks or results travels as one pickle. If the fast unpickler fails on it,
  a lenient one (:func:`loads_items`) loads it again, leaving an :class:`Unloadable` in
  place of each object that could not be rebuilt, so that only the items holding one
  fail (a module missing on one host, a reducer that raises there).
* A task's exception keeps its type; the worker-side traceback rides along as its
  ``__cause__`` (a :class:`RemoteTraceback`), like CPython's ProcessPoolExecutor. An
  exception that cannot be pickled arrives as a :class:`RemoteError` with the same text.
"""

from __future__ import annotations

import ast
import copyreg
import gc
import io
import linecache
import mmap
import pickle
import re
import sys
import threading
import traceback
import types
from dataclasses import dataclass
from typing import Literal

import cloudpickle

from ._errors import RemoteError, RemoteTraceback, SerializationError
from ._protocol import buffer_of

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


def _own_class_reducer(cls: type):
    """The reducer a class's metaclass asks for, or None (then cloudpickle decides).

    A metaclass registered with ``copyreg`` (DEAP's ``creator`` registers one that
    re-creates the class wherever it is unpickled) or defining its own ``__reduce__``
    knows how its classes travel; cloudpickle would ship them by value instead, as a
    class its metaclass may not be able to rebuild.
    """
    meta = type(cls)
    if meta is type:
        return None
    reducer = copyreg.dispatch_table.get(meta)
    if reducer is not None:
        return reducer
    for klass in meta.__mro__:
        if klass is type:
            return None
        # Called through the metaclass: looked up on the class, the name would find the
        # instances' reducer instead.
        own = vars(klass)
        if "__reduce_ex__" in own:
            return lambda c: own["__reduce_ex__"](c, 5)
        if "__reduce__" in own:
            return own["__reduce__"]
    return None


# Functions cloudpickle sent by reference, by id: (the function, its module, its name).
# Its verdict takes eight Python calls per function pickled (issue 12); a hit is taken
# only while it would still be the same: the module is the one in sys.modules, the name
# still finds this very function there (a rebound name goes to cloudpickle again, which
# then sends the function by value) and no module is registered to go by value.
_by_reference: dict[int, tuple] = {}
_BY_REFERENCE_MAX = 1024
_by_value_modules = cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
_FunctionType = types.FunctionType


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that importable ``__main__`` names go by reference and classes
    whose metaclass has a reducer of its own travel as plain pickle would send them."""

    def reducer_override(self, obj):
        if type(obj) is _FunctionType:
            hit = _by_reference.get(id(obj))
            if (hit is not None and hit[0] is obj and not _by_value_modules
                    and sys.modules.get(obj.__module__) is hit[1]
                    and obj.__qualname__ == hit[2]
                    and getattr(hit[1], hit[2], None) is obj):
                return NotImplemented  # plain pickle: a reference, as cloudpickle said
            reduced = self._reduce(obj)
            if reduced is NotImplemented:
                _note_by_reference(obj)
            return reduced
        return self._reduce(obj)

    def _reduce(self, obj):
        if isinstance(obj, types.CodeType):
            return _code_reduce(obj)
        if isinstance(obj, type):
            reducer = _own_class_reducer(obj)
            if reducer is not None:
                return reducer(obj)
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


def _note_by_reference(fn) -> None:
    """Remember that cloudpickle sends ``fn`` by reference (see ``_by_reference``)."""
    module_name, name = getattr(fn, "__module__", None), fn.__qualname__
    module = sys.modules.get(module_name) if isinstance(module_name, str) else None
    if (module is None or module_name == "__main__" or "." in name or "<" in name
            or getattr(module, name, None) is not fn):
        return  # __main__'s names are decided above; nested names are not cached
    if len(_by_reference) >= _BY_REFERENCE_MAX:
        _by_reference.clear()
    _by_reference[id(fn)] = (fn, module, name)


def _code_reduce(code: types.CodeType):
    """cloudpickle's reduction of a code object, with its file name kept: cloudpickle
    writes ``<dynamic-code>`` instead, and the worker-side tracebacks of functions sent by
    value (defined in ``__main__`` or a notebook) then show no file and no source line."""
    make, args = cloudpickle.cloudpickle._code_reduce(code)
    return make, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


class _Dumper:
    """A pickler kept for the next :func:`dumps` of its thread: making cloudpickle's costs
    two Python calls and ~0.8 us per pickle (issue 12). Its memo and globals are
    cleared after each pickle, so each one stands alone as before. A pickle larger than
    :data:`KEEP_BYTES` leaves as a view of the buffer (no copy) and the pickler is dropped
    (``spent``): the next dumps makes a new one."""

    __slots__ = ("out", "pickler", "buffers", "busy", "spent")

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.buffers: list = []
        self.busy = self.spent = False
        self.pickler = _Pickler(self.out, protocol=5, buffer_callback=self.keep_out_of_band)

    def keep_out_of_band(self, pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < OOB_MIN:
            return True  # in band
        self.buffers.append(raw)
        return False

    def dump(self, obj) -> list:
        self.busy = True
        out, pickler = self.out, self.pickler
        try:
            _dump(pickler, obj)
            if out.tell() > KEEP_BYTES:  # a view: reusing the buffer would copy it first
                self.spent = True
                return [out.getbuffer(), *self.buffers]
            return [out.getvalue(), *self.buffers]
        except RecursionError as exc:  # as cloudpickle.Pickler.dump says it
            raise pickle.PicklingError("Could not pickle object as excessively deep "
                                       "recursion required.") from exc
        finally:
            self.buffers = []
            pickler.clear_memo()
            pickler.globals_ref.clear()
            if not self.spent:
                out.seek(0)
                out.truncate()
            self.busy = False


# A pickle up to this size is copied out of a kept pickler's buffer (BytesIO.getvalue,
# then truncate: a copy of that size); a larger one leaves as a view of it.
KEEP_BYTES = 1 << 16
_dumpers = threading.local()
# The C pickler's dump: cloudpickle's Python wrapper only renames a RecursionError.
_dump = pickle.Pickler.dump


def dumps(obj) -> list:
    """Pickle ``obj`` into frames: the pickle, then its large out-of-band buffers."""
    dumper = getattr(_dumpers, "dumper", None)
    if dumper is None:
        dumper = _dumpers.dumper = _Dumper()
    elif dumper.busy:  # called from inside a pickle of this thread (a reducer's): a new one
        dumper = _Dumper()
    frames = dumper.dump(obj)
    if dumper.spent and getattr(_dumpers, "dumper", None) is dumper:
        _dumpers.dumper = None  # its buffer is the frame's now: not kept beyond it
    return frames


def _buffers(frames) -> list:
    # Out-of-band buffers are copied once so that arrays built on them are writable, as
    # they would be after a plain pickle round trip. A bytearray already is our own copy
    # (a joined split frame, a shared-memory segment's copy) and a private mapping of a
    # segment (scoop._shm) is writable too.
    return [f if isinstance(f, (bytearray, mmap.mmap)) else bytearray(buffer_of(f))
            for f in frames[1:]]


def loads(frames):
    """Unpickle frames made by :func:`dumps` (authenticate them first)."""
    if len(frames) == 1:  # no out-of-band buffer: the common case
        return pickle.loads(frames[0], buffers=())
    return pickle.loads(buffer_of(frames[0]), buffers=_buffers(frames))


# -- lenient loading ----------------------------------------------------------------------

class Unloadable:
    """Stands, in a lenient load, for an object that could not be rebuilt: ``error`` says
    why. It absorbs what later opcodes do to it, so the rest of the pickle still loads."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        object.__setattr__(self, "error", error)

    def __call__(self, *args, **kwargs):
        return self  # whatever it builds cannot be rebuilt either

    def __setattr__(self, name, value) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def append(self, item) -> None:
        pass

    extend = add = append

    def __repr__(self) -> str:
        return f"<unloadable: {type(self.error).__name__}: {self.error}>"


def _marker_in(objs, depth: int = 3) -> Unloadable | None:
    """An Unloadable among ``objs`` or in the containers they are (a few levels deep)."""
    for obj in objs:
        if isinstance(obj, Unloadable):
            return obj
        if depth and type(obj) in (tuple, list, dict, set, frozenset):
            found = _marker_in(obj.values() if type(obj) is dict else obj, depth - 1)
            if found is not None:
                return found
    return None


def _or_marker(load, consumed: int | None, replaces_memo: bool = False):
    """Wrap an opcode's loader: if it raises, the ``consumed`` stack items (None: those
    back to the mark) give way to an Unloadable carrying the first cause."""

    def load_or_mark(self) -> None:
        stack, marks = self.stack, len(self.metastack)
        if consumed is None:
            taken = list(stack)  # copy: the loader may consume the list in place
        else:
            depth = len(stack) - consumed
            taken = stack[depth:]
        try:
            load(self)
        except Exception as exc:  # noqa: BLE001 - any failure becomes the marker's cause
            if consumed is not None and depth < 0:
                raise  # stack underflow: the pickle itself is broken
            # A marker already consumed means this failure is a consequence of it: keep
            # the first cause, the one the user can act on.
            marker = _marker_in(taken) or Unloadable(exc)
            if consumed is None:
                if len(self.metastack) == marks:
                    self.pop_mark()  # failed before the mark was popped
            else:
                del stack[depth:]
            if replaces_memo:  # BUILD: the memo may hand out the half-built object
                for key, value in self.memo.items():
                    if value is taken[0]:
                        self.memo[key] = marker
            self.append(marker)

    return load_or_mark


class _LenientUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, except that opcodes importing or calling user code leave
    an :class:`Unloadable` on the stack instead of failing."""

    dispatch = dict(pickle._Unpickler.dispatch)  # a copy: the base table stays as it is
    for _code, _consumed in ((pickle.GLOBAL, 0), (pickle.STACK_GLOBAL, 2), (pickle.REDUCE, 2),
                             (pickle.NEWOBJ, 2), (pickle.NEWOBJ_EX, 3), (pickle.EXT1, 0),
                             (pickle.EXT2, 0), (pickle.EXT4, 0), (pickle.INST, None),
                             (pickle.OBJ, None)):
        dispatch[_code[0]] = _or_marker(dispatch[_code[0]], _consumed)
    dispatch[pickle.BUILD[0]] = _or_marker(dispatch[pickle.BUILD[0]], 2, replaces_memo=True)
    del _code, _consumed


_ATOMS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _unloadable_items(items: list) -> dict[int, BaseException]:
    """Index -> cause, for the items of ``items`` whose object graph holds an Unloadable.

    One walk records who refers to what; each marker then taints whatever reaches it, so
    objects shared between items (and cycles) are visited once.
    """
    modules = [m for m in list(sys.modules.values()) if isinstance(m, types.ModuleType)]
    module_dicts = {id(vars(m)) for m in modules}  # globals of loaded code: no marker there
    parents: dict[int, list[int]] = {}
    markers: list[Unloadable] = []
    seen = {id(x) for x in items}
    todo = list(items)
    while todo:
        obj = todo.pop()
        if isinstance(obj, Unloadable):
            markers.append(obj)
            continue
        if isinstance(obj, types.ModuleType) or id(obj) in module_dicts:
            continue
        for ref in gc.get_referents(obj):
            if type(ref) in _ATOMS:
                continue  # holds no marker; large data is mostly these
            parents.setdefault(id(ref), []).append(id(obj))
            if id(ref) not in seen:
                seen.add(id(ref))
                todo.append(ref)
    tainted: dict[int, Unloadable] = {}
    for marker in markers:
        up = [id(marker)]
        while up:
            i = up.pop()
            if i not in tainted:
                tainted[i] = marker
                up.extend(parents.get(i, ()))
    return {i: tainted[id(x)].error for i, x in enumerate(items) if id(x) in tainted}


def loads_items(frames) -> tuple[list, dict[int, BaseException]]:
    """Unpickle a list made by :func:`dumps`, even if some of its items cannot be rebuilt.

    Returns the items and, by index, why those that could not be rebuilt failed (such
    an item holds an :class:`Unloadable`). Raises, as :func:`loads`, if the pickle
    itself is broken.
    """
    try:
        if len(frames) == 1:  # (inline: loads)
            return pickle.loads(frames[0], buffers=()), {}
        return loads(frames), {}
    except Exception as exc:  # noqa: BLE001 - retry slowly, item by item
        # The fast unpickler stops at the first failure. Reducers that ran before it run
        # again here; the objects they built are dropped.
        try:
            items = _LenientUnpickler(io.BytesIO(buffer_of(frames[0])),
                                      buffers=_buffers(frames)).load()
        except Exception:  # noqa: BLE001 - the pickle is broken: report the first error
            raise exc from None
        if not isinstance(items, list):
            raise exc from None
        return items, _unloadable_items(items)


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
    exc.__cause__ = RemoteTraceback(with_source_lines(tb))
    return exc


_FRAME = re.compile(r'^  File "(.+)", line (\d+), in ')


def with_source_lines(tb: str) -> str:
    """``tb`` (a worker-side traceback) with the source lines only this process has
    (notebook cells, a program file the worker's host lacks) where the worker could not
    show them."""
    lines = tb.split("\n")
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        if match and not (i + 1 < len(lines) and lines[i + 1].startswith("    ")):
            source = linecache.getline(match[1], int(match[2])).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out)


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


def _parts(value, path: str):
    """(path, part) for the parts of a container or plain object, to search one level down."""
    if isinstance(value, dict):
        return [(f"{path}[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict) and not isinstance(value, (type, types.FunctionType)):
        return [(f"{path}.{k}", v) for k, v in state.items()]
    return []


def find_unpicklable(value, path: str = "result", depth: int = 6):
    """(path, the part, its error) for the innermost part of ``value`` that cannot be
    pickled, e.g. ``("result['lock']", <lock>, TypeError(...))``; None if it can be."""
    try:
        dumps(value)
        return None
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported
        error = exc
    if depth:
        for sub_path, part in _parts(value, path):
            found = find_unpicklable(part, sub_path, depth - 1)
            if found is not None:
                return found
    return path, value, error


# -- what a call stands for, in error messages --------------------------------------------

@dataclass(frozen=True)
class Runner:
    """How to read the call of one of scoop's own runners (a map chunk, say) in an error
    message: whose function to name, and where the user's results are in its result.

    Attributes:
        maps_first_argument: the user's function is the runner's first argument (name
            it, not the runner).
        results: the shape of the runner's result: ``"value"`` (one result),
            ``"chunk"`` (a map chunk's ``(results, error)``), ``"list"`` (a list of
            results that a chunk sent ahead).
    """

    maps_first_argument: bool = True
    results: Literal["value", "chunk", "list"] = "value"


# Runner functions by id (a user's callable may be unhashable), with the function kept
# alive so that its id is never reused; filled by register_runner, where each is defined.
_RUNNERS: dict[int, tuple[object, Runner]] = {}


def register_runner(fn, runner: Runner) -> None:
    """Declare ``fn`` one of scoop's runners, described by ``runner``."""
    _RUNNERS[id(fn)] = (fn, runner)


def runner_of(fn) -> Runner | None:
    """The description of ``fn`` if it is one of scoop's runners, else None."""
    entry = _RUNNERS.get(id(fn))
    return entry[1] if entry is not None and entry[0] is fn else None


def call_name(fn, args) -> str:
    """The user's function of a task: the mapped one for the chunks of a map."""
    runner = runner_of(fn)
    user = args[0] if runner is not None and runner.maps_first_argument and args else fn
    return getattr(user, "__qualname__", None) or repr(user)


def unpicklable_result_error(fn, args, value) -> SerializationError:
    """Name the function and the part of its result that cannot be pickled."""
    found = results = None
    shape = runner.results if (runner := runner_of(fn)) is not None else "value"
    if shape == "chunk" and isinstance(value, tuple) and value:
        results = value[0]  # a chunk's (results, error)
    elif shape == "list" and isinstance(value, list):
        results = value  # results a chunk sent ahead
    for result in results or ():  # name the map's own result, not the chunk's list
        found = found or find_unpicklable(result)
    path, part, error = found or find_unpicklable(value) or ("result", value, "")
    return SerializationError(
        f"{call_name(fn, args)}() returned a result that cannot be pickled to send it "
        f"back: {path} is a {type(part).__module__}.{type(part).__qualname__}: {error}")
