"""An island model whose islands evolve in parallel and evaluate their individuals with
nested ``futures.map`` calls (tasks that submit tasks), with ring migration in between::

    python -m scoop -n 4 examples/deap/islands.py

Each island draws from DEAP's ``random`` with its own saved state, restored around the
waits on its evaluations: other islands run on the same worker while one waits, so a
shared generator would make the result depend on timing. With the state saved, the run
is the same with any number of workers. Prints the best fitness of each island.
"""

import random

from deap import algorithms, base, creator, tools

from scoop import futures

creator.create("FitnessMax", base.Fitness, weights=(1.0,))
creator.create("Individual", list, fitness=creator.FitnessMax)

toolbox = base.Toolbox()
toolbox.register("attr_bool", random.randint, 0, 1)
toolbox.register("individual", tools.initRepeat, creator.Individual, toolbox.attr_bool, 60)
toolbox.register("population", tools.initRepeat, list, toolbox.individual)


def evalOneMax(individual):  # noqa: N802 - DEAP's name
    return (sum(individual),)


toolbox.register("evaluate", evalOneMax)
toolbox.register("mate", tools.cxTwoPoint)
toolbox.register("mutate", tools.mutFlipBit, indpb=0.05)
toolbox.register("select", tools.selTournament, tournsize=3)
toolbox.register("map", futures.map)


def evaluate(population):
    """Give every individual without a valid fitness one, through a nested map."""
    invalid = [ind for ind in population if not ind.fitness.valid]
    for ind, fit in zip(invalid, toolbox.map(toolbox.evaluate, invalid)):
        ind.fitness.values = fit


def evolve(island, seed, ngen):
    """``ngen`` generations of one island (a task): its own random state between waits."""
    state = random.Random(seed).getstate()
    pop = [toolbox.clone(ind) for ind in island]
    evaluate(pop)
    for _ in range(ngen):
        random.setstate(state)
        offspring = toolbox.select(pop, len(pop))
        offspring = algorithms.varAnd(offspring, toolbox, cxpb=0.5, mutpb=0.2)
        state = random.getstate()
        evaluate(offspring)  # waits: other islands may run here and draw numbers
        pop[:] = offspring
    return pop


def main(nisles=4, epochs=4, freq=5):
    random.seed(64)
    islands = [toolbox.population(n=80) for _ in range(nisles)]
    # Islands that run in this process set the shared generator: seeds come from another.
    seeder = random.Random(64)
    for _ in range(epochs):
        seeds = [seeder.randrange(2**32) for _ in islands]
        islands = list(futures.map(evolve, islands, seeds, [freq] * nisles))
        tools.migRing(islands, 10, tools.selBest)
    return islands


if __name__ == "__main__":
    islands = main()
    print("best per island", [tools.selBest(isl, 1)[0].fitness.values[0] for isl in islands])
