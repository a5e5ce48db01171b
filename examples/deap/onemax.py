"""OneMax with DEAP, written as DEAP's tutorial writes it: lists of bits, ``eaSimple``.

The only line that makes it parallel is ``toolbox.register("map", futures.map)``::

    python -m scoop -n 4 examples/deap/onemax.py
    python examples/deap/onemax.py          # the same result, one evaluation at a time

Prints the best individual's fitness and the last generation's statistics.
"""

import random

import numpy
from deap import algorithms, base, creator, tools

from scoop import futures

creator.create("FitnessMax", base.Fitness, weights=(1.0,))
creator.create("Individual", list, fitness=creator.FitnessMax)

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


def main():
    random.seed(64)
    pop = toolbox.population(n=300)
    hof = tools.HallOfFame(1)
    stats = tools.Statistics(lambda ind: ind.fitness.values)
    stats.register("avg", numpy.mean)
    stats.register("max", numpy.max)
    pop, log = algorithms.eaSimple(pop, toolbox, cxpb=0.5, mutpb=0.2, ngen=20, stats=stats,
                                   halloffame=hof, verbose=False)
    return hof, log


if __name__ == "__main__":
    hof, log = main()
    print("best", hof[0].fitness.values, "".join(map(str, hof[0])))
    print("last generation", log[-1])
