"""Multi-objective optimisation with NSGA-II (DEAP's ``nsga2`` example, shortened): an
explicit generational loop whose evaluations go through ``toolbox.map``::

    python -m scoop -n 4 examples/deap/nsga2.py

Prints the final population's hypervolume and its best value on each objective.
"""

import array
import random

from deap import base, benchmarks, creator, tools
from deap.benchmarks.tools import hypervolume

from scoop import futures

creator.create("FitnessMin", base.Fitness, weights=(-1.0, -1.0))
creator.create("Individual", array.array, typecode="d", fitness=creator.FitnessMin)

BOUND_LOW, BOUND_UP = 0.0, 1.0
NDIM = 30


def uniform(low, up, size):
    return [random.uniform(low, up) for _ in range(size)]


toolbox = base.Toolbox()
toolbox.register("attr_float", uniform, BOUND_LOW, BOUND_UP, NDIM)
toolbox.register("individual", tools.initIterate, creator.Individual, toolbox.attr_float)
toolbox.register("population", tools.initRepeat, list, toolbox.individual)
toolbox.register("evaluate", benchmarks.zdt1)
toolbox.register("mate", tools.cxSimulatedBinaryBounded, low=BOUND_LOW, up=BOUND_UP, eta=20.0)
toolbox.register("mutate", tools.mutPolynomialBounded, low=BOUND_LOW, up=BOUND_UP, eta=20.0,
                 indpb=1.0 / NDIM)
toolbox.register("select", tools.selNSGA2)
toolbox.register("map", futures.map)


def evaluate_invalid(population):
    invalid_ind = [ind for ind in population if not ind.fitness.valid]
    for ind, fit in zip(invalid_ind, toolbox.map(toolbox.evaluate, invalid_ind)):
        ind.fitness.values = fit


def main(ngen=30, mu=100, cxpb=0.9):
    random.seed(64)
    pop = toolbox.population(n=mu)
    evaluate_invalid(pop)
    pop = toolbox.select(pop, len(pop))  # assigns the crowding distances
    for _ in range(1, ngen):
        offspring = [toolbox.clone(ind) for ind in tools.selTournamentDCD(pop, len(pop))]
        for ind1, ind2 in zip(offspring[::2], offspring[1::2]):
            if random.random() <= cxpb:
                toolbox.mate(ind1, ind2)
            toolbox.mutate(ind1)
            toolbox.mutate(ind2)
            del ind1.fitness.values, ind2.fitness.values
        evaluate_invalid(offspring)
        pop = toolbox.select(pop + offspring, mu)
    return pop


if __name__ == "__main__":
    pop = main()
    front = [ind.fitness.values for ind in pop]
    print("hypervolume", repr(hypervolume(pop, [11.0, 11.0])))
    print("best per objective", min(f[0] for f in front), min(f[1] for f in front))
