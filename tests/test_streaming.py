"""Maps that stream (issue 11): the input is read as the results are consumed, at most
``buffersize`` items in flight; a map stopped early reads no more and the job ends
cleanly; lengths are reported where the input has them.

Each scenario is a real job (``python -m scoop -n 2 prog.py SCENARIO``), and the
laziness ones also run with plain ``python`` (the in-process fallback). The program
prints one JSON line of facts; the tests check them."""

from __future__ import annotations

import json
import operator
import subprocess
import sys

import cloudpickle
import pytest

from scoop import _mapping, futures

from conftest import run_scoop, write_program

# The pool's worker cannot import test modules: this module's functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]

PROGRAM = r'''
import itertools, json, operator, resource, sys, time
from scoop import futures

READ = [0]  # how far the input was read

def counted(items):
    for x in items:
        READ[0] += 1
        yield x

def square(x):
    return x * x

def fail_at(x, bad=500):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x

def nap(x):
    time.sleep(x)
    return x

def broken_input(n):
    yield from range(n)
    raise KeyError("the input broke")

def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def length(it):
    try:
        return len(it)
    except TypeError:
        return None

def endless():
    """An endless input, a few items taken: the map returns and the job ends."""
    first = list(itertools.islice(futures.map(square, counted(itertools.count())), 1000))
    ok = first == [x * x for x in range(1000)]
    read_map = READ[0]
    READ[0] = 0
    done = list(itertools.islice(
        futures.map_as_completed(square, counted(itertools.count())), 1000))
    ok_done = len(done) == 1000 and len(set(done)) == 1000
    it = futures.map(square, counted(itertools.count()), buffersize=64)
    next(it)
    it.close()
    closed = list(it)
    return dict(ok=ok, ok_done=ok_done, read_map=read_map, read_done=READ[0],
                after_close=closed)

def bounded():
    """A slow consumer: the input is read at most buffersize items ahead."""
    out = {}
    for name, make in (("map", futures.map), ("done", futures.map_as_completed)):
        READ[0] = 0
        ahead, got = 0, []
        for i, r in enumerate(make(square, counted(range(300)), buffersize=20)):
            got.append(r)
            ahead = max(ahead, READ[0] - (i + 1))
            time.sleep(0.001)
        out[name] = dict(ahead=ahead, read=READ[0], ok=sorted(got) == [x * x for x in range(300)])
    # the default window: a few chunks per worker, nowhere near an endless input
    READ[0] = 0
    it = futures.map(square, counted(itertools.count()))
    for _ in range(100):
        next(it)
        time.sleep(0.001)
    out["default_read"] = READ[0]
    it.close()
    return out

def lengths():
    data = list(range(50))
    cases = {
        "list": futures.map(square, data),
        "range": futures.map(square, range(70)),
        "zip": futures.map(operator.add, data, range(30)),
        "generator": futures.map(square, (x for x in data)),
        "generator_zip": futures.map(operator.add, data, (x for x in data)),
        "iterator": futures.map(square, iter(data)),
        "done_list": futures.map_as_completed(square, data),
        "done_generator": futures.map_as_completed(square, (x for x in data)),
    }
    out = {name: [length(it), operator.length_hint(it, -1), len(list(it))]
           for name, it in cases.items()}
    try:
        from tqdm import tqdm
    except ImportError:
        out["tqdm"] = None
    else:
        import io
        bar = tqdm(futures.map(square, data), file=io.StringIO())
        out["tqdm"] = [bar.total, sum(bar)]
    return out

def memory():
    n = int(sys.argv[2])
    start = maxrss_mb()
    total = sum(futures.map(abs, range(n)))
    after_map = maxrss_mb()
    everything = list(zip(range(n)))  # what reading the whole input held
    after_list = maxrss_mb()
    return dict(ok=total == n * (n - 1) // 2, map_mb=after_map - start,
                list_mb=after_list - after_map, n=len(everything))

def errors():
    out = {}
    READ[0] = 0
    got = []
    try:
        for r in futures.map(fail_at, counted(range(100_000)), buffersize=100):
            got.append(r)
    except ValueError as exc:
        out["map"] = [got == list(range(500)), str(exc), READ[0]]
    got = []
    try:
        for r in futures.map(square, broken_input(300)):
            got.append(r)
    except KeyError as exc:
        out["input"] = [got == [x * x for x in range(300)], str(exc)]
    got = []
    try:
        for r in futures.map_as_completed(fail_at, range(1000), chunksize=10):
            got.append(r)
    except ValueError as exc:
        out["done"] = [len(got) < 1000, str(exc)]
    try:
        list(futures.map(nap, [0.0, 2.0, 2.0, 2.0], timeout=0.5, chunksize=1))
    except futures.TimeoutError:
        out["timeout"] = True
    try:
        list(futures.map_as_completed(nap, counted([2.0] * 50), timeout=0.5, chunksize=1))
    except futures.TimeoutError:
        out["timeout_done"] = True
    return out

def reductions():
    gen = (x for x in range(10_000))
    return dict(
        reduce=futures.mapReduce(square, operator.add, gen) == sum(x * x for x in range(10_000)),
        scan=futures.mapScan(square, operator.add, (x for x in range(3000)))
        == list(itertools.accumulate(x * x for x in range(3000))),
        chunked=list(futures.map(square, range(1000), chunksize=7, buffersize=3))
        == [x * x for x in range(1000)],
        # a map reading another one as it goes: a pipeline
        pipeline=list(futures.map(square, futures.map(square, (x for x in range(5000)))))
        == [x ** 4 for x in range(5000)],
    )

def where(x):
    import scoop
    return scoop.worker

def nested(x):
    return futures.submit(square, x).result() + 1

def per_cpu():
    """More workers than CPUs here (this host is told it has one): maps of items that
    compute are cut for the CPUs, the first item of a function's first map run at the
    call; items that wait go to every worker; the results are the builtin map's."""
    from scoop import _mapping
    _mapping.usable_cpus = lambda: 1
    data = list(range(3000))
    out = dict(idle=_mapping.idle_workers())
    it = futures.map(nap, [0.01] * 40)
    out["nap"] = [it._feed.per_cpu, list(it) == [0.01] * 40]
    it = futures.map(square, data)
    out["square"] = [it._feed.per_cpu == _mapping._computes[square],
                     list(it) == [x * x for x in data]]
    it = futures.map(square, data)  # the verdict is remembered: no item runs at the call
    out["again"] = [it._feed.per_cpu == _mapping._computes[square],
                    not isinstance(it._feed.futs[0][0], _mapping._Ran),
                    list(it) == [x * x for x in data]]
    out["done"] = sorted(futures.map_as_completed(square, data)) == [x * x for x in data]
    neg = lambda x: -x  # noqa: E731 - a function not mapped before
    it = futures.map(neg, (x for x in data))  # a generator: paced, its first item here
    out["generator"] = [it._feed.per_cpu == _mapping._computes[neg],
                        list(it) == [-x for x in data]]
    out["nested"] = list(futures.map(nested, range(50))) == [x * x + 1 for x in range(50)]
    got = []
    try:
        for r in futures.map(lambda x: fail_at(x, bad=0), data):
            got.append(r)
    except ValueError as exc:
        out["first_fails"] = [got, str(exc)]
    try:
        list(futures.map(square, broken_input(0)))
    except KeyError as exc:
        out["input_fails"] = str(exc)
    out["empty"] = list(futures.map(square, []))
    it = futures.map(where, range(20), task_timeout=30)  # never on the root
    out["limited"] = [it._feed.per_cpu, 0 in list(it)]
    return out

if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
'''


def _run(tmp_path, scenario: str, *args: str, serial: bool = False, n: int = 2) -> dict:
    prog = write_program(tmp_path, PROGRAM)
    if serial:
        proc = subprocess.run([sys.executable, prog, scenario, *args], capture_output=True,
                              text=True, timeout=60)
    else:
        proc = run_scoop("-n", str(n), prog, scenario, *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("serial", [False, True], ids=["job", "serial"])
def test_endless_input_islice_returns_and_the_job_ends(tmp_path, serial):
    out = _run(tmp_path, "endless", serial=serial)
    assert out["ok"] and out["ok_done"]
    bound = 1000 + _mapping.MAX_IN_FLIGHT
    assert out["read_map"] < bound and out["read_done"] < bound
    assert out["after_close"] == []


@pytest.mark.parametrize("serial", [False, True], ids=["job", "serial"])
def test_reading_is_bounded_by_buffersize_while_the_consumer_is_slow(tmp_path, serial):
    out = _run(tmp_path, "bounded", serial=serial)
    for name in ("map", "done"):
        assert out[name]["ok"], out
        assert out[name]["ahead"] <= 20, out  # buffersize
        assert out[name]["read"] == 300, out
    # 100 results of an endless input: the first chunks hold one item, then grow
    assert out["default_read"] < 100 + _mapping.MAX_IN_FLIGHT


def test_lengths_are_reported_where_the_input_has_them(tmp_path):
    out = _run(tmp_path, "lengths")
    assert out["list"] == [50, 50, 50]
    assert out["range"] == [70, 70, 70]
    assert out["zip"] == [30, 30, 30]  # the shortest
    assert out["generator"] == [None, -1, 50]
    assert out["generator_zip"] == [None, -1, 50]
    assert out["iterator"] == [None, 50, 50]  # a length hint only
    assert out["done_list"] == [50, 50, 50]
    assert out["done_generator"] == [None, -1, 50]
    if out["tqdm"] is None:
        pytest.skip("tqdm is not installed: its total was not checked")
    assert out["tqdm"] == [50, sum(x * x for x in range(50))]


def test_memory_of_a_big_map_stays_flat(tmp_path):
    """The root's peak RSS grows by a few chunks, not by the input (a generous bound:
    half of what a list of the input's items costs, and 64 MB)."""
    out = _run(tmp_path, "memory", str(3 * 10**6))
    assert out["ok"]
    assert out["list_mb"] > 60, out  # reading everything costs this much
    assert out["map_mb"] < min(64, out["list_mb"] / 2), out


def test_exceptions_mid_stream(tmp_path):
    out = _run(tmp_path, "errors")
    ok, message, read = out["map"]
    assert ok and message == "bad item 500"
    assert read <= 500 + 100  # the input is not read on after the failure
    assert out["input"] == [True, "'the input broke'"]
    assert out["done"] == [True, "bad item 500"]
    assert out["timeout"] and out["timeout_done"]


def test_map_reduce_scan_small_windows_and_pipelines(tmp_path):
    assert _run(tmp_path, "reductions") == dict(reduce=True, scan=True, chunked=True,
                                                pipeline=True)


def test_maps_cut_for_the_cpus_where_workers_outnumber_them(tmp_path):
    """Issue 12: with more workers on a host than CPUs, maps of items that compute cut
    their chunks for the CPUs (more chunks would only cost messages); items that wait
    still go to every worker; results, errors and limits are as everywhere."""
    out = _run(tmp_path, "per_cpu", n=3)
    assert out["idle"] == 2
    assert out["nap"] == [False, True]  # sleeping items: cut for the workers
    assert out["square"] == [True, True] and out["again"] == [True, True, True]
    assert out["done"] and out["nested"] and out["generator"] == [True, True]
    assert out["first_fails"] == [[], "bad item 0"]
    assert out["input_fails"] == "'the input broke'"
    assert out["empty"] == []
    assert out["limited"] == [False, False]  # a limited item never runs on the root


def test_a_stale_fast_pace_cuts_no_fewer_chunks_than_pool():
    """The floor of work per chunk stops at CHUNKS_AHEAD chunks per worker (Pool's
    heuristic): a pace remembered from cheap items cannot put the map in one chunk."""
    import functools

    from scoop._runtime.worker import Worker

    func = functools.partial(abs)
    _mapping._remember_pace(func, 1e-9)  # 2 ms of work would be 2,000,000 items
    feed = _mapping.Feed(func, (), (range(800),), rt=Worker(0))  # one worker, no job
    assert [n for _, n, *_ in feed.futs] == [400, 200, 200]


@pytest.mark.parametrize("hosts, cpus, idle", [
    ((("127.0.0.1", 4),), 4, 0), ((("127.0.0.1", 128),), 2, 126),
    ((("localhost", 3), ("127.0.0.1", 3)), 2, 4),
    ((("127.0.0.1", 2), ("node-elsewhere.invalid", 64)), 2, 0),  # other hosts: unknown
    ((("127.0.0.1", 8), ("node-elsewhere.invalid", 64)), 2, 6),
])
def test_idle_workers_are_this_hosts_workers_beyond_its_cpus(hosts, cpus, idle):
    assert _mapping._idle_workers(hosts, cpus) == idle


def test_the_chunk_floor_is_min_chunk_s_at_the_quickest_pace_seen():
    """Chunks of an input with a length hold at least MIN_CHUNK_S of work at the
    quickest turnaround per item of the map (or remembered from the function's last
    map), not of its last chunks only (whose turnaround includes their queueing)."""
    def cheap(x):
        return x

    pace = _mapping._Pace(cheap, ahead=2)
    assert pace.least() == 0  # nothing seen yet: the guided sizes alone
    for per_item in (4e-6, 1e-6, 3e-6, 5e-6):  # the quickest leaves the window
        pace.took(per_item)
    assert pace.least() == int(_mapping.MIN_CHUNK_S / 1e-6)
    pace.remember()
    assert _mapping._Pace(cheap, ahead=2).least() == int(_mapping.MIN_CHUNK_S / 1e-6)


@pytest.mark.parametrize("kwargs, error", [
    (dict(chunksize=0), ValueError), (dict(buffersize=0), ValueError),
    (dict(buffersize=-3), ValueError), (dict(buffersize=2.5), TypeError),
])
def test_bad_sizes_raise_at_the_call(kwargs, error):
    for call in (futures.map, futures.map_as_completed):
        with pytest.raises(error):
            call(abs, [1, 2], **kwargs)


def _inputs(kind: str, n: int):
    if kind == "list":
        return (list(range(n)),)
    if kind == "generator":
        return ((x for x in range(n)),)
    if kind == "iterator":
        return (iter(list(range(n))),)
    return (range(n), (x for x in range(n + 3)))  # zipped: the shortest wins


def _pair(*args):
    return args


@pytest.mark.usefixtures("pool")
@pytest.mark.parametrize("kind", ["list", "generator", "iterator", "zip"])
@pytest.mark.parametrize("n, chunksize, buffersize", [
    (0, None, None), (1, None, None), (37, None, None), (5000, None, None),
    (300, 1, None), (300, 7, 5), (300, None, 1), (300, None, 64), (2000, 3, 1000),
])
def test_map_gives_the_builtin_results(kind, n, chunksize, buffersize):
    """In the in-process job (this process is the root, one more worker): every window
    and chunk size gives the builtin map's results, in order or all of them. (No map is
    stopped early here: its chunks already shipped would still run, and the pool's root
    would run the next tests' futures itself while they count as away.)"""
    expect = list(map(_pair, *_inputs(kind, n)))
    got = futures.map(_pair, *_inputs(kind, n), chunksize=chunksize, buffersize=buffersize)
    if kind in ("list", "iterator"):
        assert operator.length_hint(got, -1) == n
    assert list(got) == expect
    done = futures.map_as_completed(_pair, *_inputs(kind, n), chunksize=chunksize,
                                    buffersize=buffersize)
    assert sorted(done) == expect
