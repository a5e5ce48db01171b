"""Classes whose metaclass says how they travel are sent as plain pickle sends them.

DEAP's ``creator`` registers a reducer for its metaclass with ``copyreg``: a creator class
is re-created (and re-bound in ``deap.creator``) wherever it is unpickled. After that,
``type(ind)`` of an older individual is no longer ``creator.Individual``, and cloudpickle,
left alone, would send the class by value, which DEAP's metaclass cannot rebuild
("metaclass conflict"). These tests pickle such objects on every path: in this process,
shipped to a worker and back, handed back by a timed wait, and nested.
"""

from __future__ import annotations

import pickle
import sys

import cloudpickle
import pytest

from scoop import _serialize, futures

creator = pytest.importorskip("deap.creator")
base = pytest.importorskip("deap.base")

# Pool workers cannot import test modules: this module's functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

if not hasattr(creator, "ScoopTestFitness"):
    creator.create("ScoopTestFitness", base.Fitness, weights=(1.0,))
    creator.create("ScoopTestIndividual", list, fitness=creator.ScoopTestFitness)


def individual(genes) -> list:
    ind = creator.ScoopTestIndividual(genes)
    ind.fitness.values = (float(sum(genes)),)
    return ind


def round_trip(obj):
    return _serialize.loads(_serialize.dumps(obj))


def test_an_individual_outlives_its_class_being_rebound():
    old = individual([1, 0, 1])
    first = round_trip(old)  # re-creates and re-binds creator.ScoopTestIndividual
    assert type(old) is not creator.ScoopTestIndividual
    again = round_trip(old)  # its class is no longer the module's: still by reducer
    for ind in (first, again, round_trip(first)):
        assert list(ind) == [1, 0, 1] and ind.fitness.values == (2.0,)
        assert type(ind).__name__ == "ScoopTestIndividual"


def test_the_pickle_is_the_one_plain_pickle_makes():
    ind = individual([1, 1])
    frames = _serialize.dumps(ind)
    assert bytes(frames[0]) == pickle.dumps(ind, protocol=5)


class _Remade(type):
    """A metaclass with a ``__reduce__`` of its own (no copyreg entry)."""

    def __reduce__(cls):
        return _remake, (cls.__name__, cls.tag)


def _remake(name, tag):
    return _Remade(name, (), {"tag": tag})


def test_a_metaclass_reduce_is_honoured():
    cls = _remake("Made", 7)  # not reachable by name: cloudpickle would send it by value
    copy = round_trip(cls)
    assert copy is not cls and type(copy) is _Remade and copy.tag == 7


def score(ind) -> tuple:
    return (ind.fitness.values[0], type(ind).__name__, list(ind))


def breed(pop):
    """A task that sends individuals on, in a nested map."""
    return list(futures.map(score, pop))


def test_individuals_shipped_returned_and_sent_again(pool):
    pop = [individual([i, i + 1]) for i in range(40)]
    expected = [(2.0 * i + 1, "ScoopTestIndividual", [i, i + 1]) for i in range(40)]
    assert list(futures.map(score, pop)) == expected
    back = list(futures.map(round_trip, pop))  # each comes back as a re-created class
    assert list(futures.map(score, back)) == expected
    assert futures.submit(breed, back).result() == expected


def test_individuals_handed_back_by_a_timed_wait(pool):
    pop = [individual([i]) for i in range(200)]
    fs = [futures.submit(score, ind) for ind in pop]
    # A timed wait hands back what this worker had queued: those are pickled again.
    done, _ = futures.wait(fs[-1:], timeout=30)
    assert done
    assert [f.result(timeout=30) for f in fs] == [
        (float(i), "ScoopTestIndividual", [i]) for i in range(200)]
