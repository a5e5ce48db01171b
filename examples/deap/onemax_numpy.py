"""OneMax with ``numpy.ndarray`` individuals, as DEAP's numpy tutorial teaches: a copying
crossover, and a hall of fame that compares arrays with ``numpy.array_equal``::

    python -m scoop -n 4 examples/deap/onemax_numpy.py

Prints the best individual and its fitness.
"""

import random

import numpy
from deap import algorithms, base, creator, tools

from scoop import futures

creator.create("FitnessMax", base.Fitness, weights=(1.0,))
creator.create("Individual", numpy.ndarray, fitness=creator.FitnessMax)

toolbox = base.Toolbox()
toolbox.register("attr_bool", random.randint, 0, 1)
toolbox.register("individual", tools.initRepeat, creator.Individual, toolbox.attr_bool, 100)
toolbox.register("population", tools.initRepeat, list, toolbox.individual)


def evalOneMax(individual):  # noqa: N802 - DEAP's name
    return (int(individual.sum()),)


def cxTwoPointCopy(ind1, ind2):  # noqa: N802 - DEAP's name
    """Two-point crossover that swaps copies: numpy slices are views."""
    size = len(ind1)
    cxpoint1 = random.randint(1, size)
    cxpoint2 = random.randint(1, size - 1)
    if cxpoint2 >= cxpoint1:
        cxpoint2 += 1
    else:
        cxpoint1, cxpoint2 = cxpoint2, cxpoint1
    ind1[cxpoint1:cxpoint2], ind2[cxpoint1:cxpoint2] = (
        ind2[cxpoint1:cxpoint2].copy(), ind1[cxpoint1:cxpoint2].copy())
    return ind1, ind2


toolbox.register("evaluate", evalOneMax)
toolbox.register("mate", cxTwoPointCopy)
toolbox.register("mutate", tools.mutFlipBit, indpb=0.05)
toolbox.register("select", tools.selTournament, tournsize=3)
toolbox.register("map", futures.map)

if __name__ == "__main__":
    random.seed(64)
    pop = toolbox.population(n=300)
    hof = tools.HallOfFame(1, similar=numpy.array_equal)
    algorithms.eaSimple(pop, toolbox, cxpb=0.5, mutpb=0.2, ngen=20, halloffame=hof,
                        verbose=False)
    print("best", hof[0].fitness.values, "".join(map(str, hof[0].tolist())))
