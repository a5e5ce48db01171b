"""A DEAP-style evolutionary algorithm whose evaluations run in parallel.

DEAP parallelises an algorithm by registering SCOOP's ``futures.map`` as the toolbox's
``map``: ``toolbox.register("map", futures.map)``. This example does the same without
importing DEAP: a tiny ``Toolbox`` holds the operators, a population of individuals
(lists of floats) is evolved for a few generations to minimise the sum of squares, and
every generation's fitnesses are computed with ``toolbox.map`` (parallel) and checked
against the built-in ``map`` (serial). All randomness comes from one seeded
``random.Random`` in the root, so the run is reproducible.

Run it with::

    python -m scoop -n 2 examples/deap_style.py

Prints ``deap_style: OK 10 generations, population 100``.
"""

import functools
import random

from scoop import futures

POP_SIZE = 100
N_GEN = 10
DIM = 10
TOURNAMENT = 3
MUT_SIGMA = 0.3
MUT_PROB = 0.2


class Toolbox:
    """A minimal stand-in for ``deap.base.Toolbox``: named, partially applied callables."""

    def register(self, alias, function, *args, **kwargs):
        setattr(self, alias, functools.partial(function, *args, **kwargs))


def evaluate(individual):
    """The fitness to minimise: the sum of squares of the genes."""
    return sum(g * g for g in individual)


def make_individual(rng):
    return [rng.uniform(-5.0, 5.0) for _ in range(DIM)]


def select_tournament(rng, population, fitnesses, k):
    """Pick ``k`` individuals, each the best of ``TOURNAMENT`` random ones."""
    chosen = []
    for _ in range(k):
        aspirants = [rng.randrange(len(population)) for _ in range(TOURNAMENT)]
        best = min(aspirants, key=lambda i: fitnesses[i])
        chosen.append(list(population[best]))
    return chosen


def mutate_gaussian(rng, individual):
    return [g + rng.gauss(0.0, MUT_SIGMA) if rng.random() < MUT_PROB else g
            for g in individual]


def evolve(toolbox, rng):
    population = [toolbox.individual(rng) for _ in range(POP_SIZE)]
    history = []
    for _ in range(N_GEN):
        fitnesses = list(toolbox.map(toolbox.evaluate, population))
        assert fitnesses == list(map(toolbox.evaluate, population)), \
            "parallel evaluation differs from the serial one"
        history.append(min(fitnesses))
        offspring = toolbox.select(rng, population, fitnesses, len(population))
        population = [toolbox.mutate(rng, ind) for ind in offspring]
    fitnesses = list(toolbox.map(toolbox.evaluate, population))
    history.append(min(fitnesses))
    return history


if __name__ == "__main__":
    toolbox = Toolbox()
    toolbox.register("map", futures.map)  # the one line that makes DEAP parallel
    toolbox.register("individual", make_individual)
    toolbox.register("evaluate", evaluate)
    toolbox.register("select", select_tournament)
    toolbox.register("mutate", mutate_gaussian)

    history = evolve(toolbox, random.Random(42))

    # The whole run, repeated serially with the same seed, gives the same history.
    serial = Toolbox()
    serial.__dict__.update(toolbox.__dict__)
    serial.register("map", map)
    assert evolve(serial, random.Random(42)) == history, "serial run differs"
    assert history[-1] < history[0], f"no progress: {history}"

    print(f"best fitness: {history[0]:.3f} -> {history[-1]:.3f}")
    print(f"deap_style: OK {N_GEN} generations, population {POP_SIZE}")
