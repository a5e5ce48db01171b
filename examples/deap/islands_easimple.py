"""DEAP's own SCOOP island example (``onemax_island_scoop``): each task runs a whole
``eaSimple`` on one island with the toolbox it was sent, whose ``map`` is ``futures.map``
(maps nested in tasks), and the islands exchange their best in a ring::

    python -m scoop -n 4 examples/deap/islands_easimple.py

The islands draw from each worker's own random generator, so the individuals found
depend on the number of workers and on timing; the program checks what does not.
Prints ``islands_easimple: 5 islands of 100, every individual evaluated``.
"""

import array
import random

from deap import algorithms, base, creator, tools

from scoop import futures

creator.create("FitnessMax", base.Fitness, weights=(1.0,))
creator.create("Individual", array.array, typecode="b", fitness=creator.FitnessMax)

toolbox = base.Toolbox()
toolbox.register("attr_bool", random.randint, 0, 1)
toolbox.register("individual", tools.initRepeat, creator.Individual, toolbox.attr_bool, 100)
toolbox.register("population", tools.initRepeat, list, toolbox.individual)


def evalOneMax(individual):  # noqa: N802 - DEAP's name
    return (sum(individual),)


toolbox.register("evaluate", evalOneMax)
toolbox.register("mate", tools.cxTwoPoint)
toolbox.register("mutate", tools.mutFlipBit, indpb=0.05)
toolbox.register("select", tools.selTournament, tournsize=3)
toolbox.register("map", futures.map)


def main(nisles=5, ngen=20, freq=5):
    random.seed(64)
    islands = [toolbox.population(n=100) for _ in range(nisles)]
    # As DEAP's example does: the initialisers are not needed by the islands.
    toolbox.unregister("attr_bool")
    toolbox.unregister("individual")
    toolbox.unregister("population")
    toolbox.register("algorithm", algorithms.eaSimple, toolbox=toolbox, cxpb=0.5,
                     mutpb=0.2, ngen=freq, verbose=False)
    for _ in range(0, ngen, freq):
        results = toolbox.map(toolbox.algorithm, islands)
        islands = [pop for pop, logbook in results]
        tools.migRing(islands, 15, tools.selBest)
    return islands


if __name__ == "__main__":
    islands = main()
    sizes = {len(isl) for isl in islands}
    assert sizes == {100}, sizes
    assert all(ind.fitness.valid and ind.fitness.values == (sum(ind),)
               for isl in islands for ind in isl)
    best = max(ind.fitness.values[0] for isl in islands for ind in isl)
    assert best > 70, best
    print(f"islands_easimple: {len(islands)} islands of 100, every individual evaluated")
