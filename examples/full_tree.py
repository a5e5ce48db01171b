"""Nested futures: a full binary tree where every node submits its two children.

Each inner node submits two futures (its subtrees) and returns the sum of their
results; each leaf returns 1, so the root's result is the number of leaves,
``2 ** depth``. Waiting on a future inside a future is allowed at any depth: the waiting
task is parked and its worker keeps running other tasks meanwhile.

Run it with (depth defaults to 10)::

    python -m scoop -n 2 examples/full_tree.py [depth]

Prints ``full_tree: OK depth 10, 1024 leaves``.
"""

import sys

from scoop import futures


def node(depth):
    """Count the leaves below a node ``depth`` levels above the leaves."""
    if depth == 0:
        return 1
    left = futures.submit(node, depth - 1)
    right = futures.submit(node, depth - 1)
    return left.result() + right.result()


if __name__ == "__main__":
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    leaves = futures.submit(node, depth).result()
    assert leaves == 2 ** depth, f"expected {2 ** depth} leaves, got {leaves}"
    print(f"full_tree: OK depth {depth}, {leaves} leaves")
