"""CMA-ES on the Rastrigin function (DEAP's ``cma_minfct`` example, smaller): the strategy
generates each population and ``eaGenerateUpdate`` evaluates it with ``toolbox.map``::

    python -m scoop -n 4 examples/deap/cma_es.py

The strategy draws from numpy's random generator, in the root only. Prints the best
fitness found.
"""

import numpy
from deap import algorithms, base, benchmarks, cma, creator, tools

from scoop import futures

N = 10

creator.create("FitnessMin", base.Fitness, weights=(-1.0,))
creator.create("Individual", list, fitness=creator.FitnessMin)

toolbox = base.Toolbox()
toolbox.register("evaluate", benchmarks.rastrigin)
toolbox.register("map", futures.map)

if __name__ == "__main__":
    numpy.random.seed(128)
    strategy = cma.Strategy(centroid=[5.0] * N, sigma=5.0, lambda_=20 * N)
    toolbox.register("generate", strategy.generate, creator.Individual)
    toolbox.register("update", strategy.update)
    hof = tools.HallOfFame(1)
    stats = tools.Statistics(lambda ind: ind.fitness.values)
    stats.register("min", numpy.min)
    pop, log = algorithms.eaGenerateUpdate(toolbox, ngen=60, stats=stats, halloffame=hof,
                                           verbose=False)
    print("best", repr(hof[0].fitness.values[0]), "min per generation",
          [round(float(r["min"]), 6) for r in log[::10]])
