"""Real DEAP programs (examples/deap/), unchanged, under scoop: the same answer as serial.

DEAP is SCOOP's largest client: its docs have users write
``toolbox.register("map", futures.map)``. Each program of the corpus is written in one of
DEAP's documented styles (list, ``array.array`` and numpy individuals, GP trees,
NSGA-II, CMA-ES, islands with nested maps) and seeds its generators, so plain ``python``,
``-n 1`` and ``-n 2`` must print exactly the same thing. The corpus runs on the DEAP
installed with the test extras (1.4) and on DEAP 1.3, installed from the package index
into ``.deps/`` on first use (skipped, saying why, when the index cannot be reached).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("deap", reason="DEAP is a test dependency: pip install -e '.[test]'")

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_leftovers")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "examples", "deap")
SEEDED = ["onemax", "onemax_array", "onemax_numpy", "symbreg_gp", "nsga2", "cma_es",
          "islands"]
DEAP_13 = "deap==1.3.3"
RUN_TIMEOUT_S = 120


def run(program: str, *launcher: str, pythonpath: str | None = None) -> str:
    """stdout of ``python [-m scoop LAUNCHER] examples/deap/PROGRAM.py``; must exit 0."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, *(["-m", "scoop", *launcher] if launcher else []),
            os.path.join(CORPUS, program + ".py")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, (f"{' '.join(argv[1:])}: exit status {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    assert proc.stdout.strip(), f"{program} printed nothing\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def deap_13() -> str:
    """A folder holding DEAP 1.3, for PYTHONPATH (installed once, kept in .deps/)."""
    target = os.path.join(REPO, ".deps", f"deap-1.3-py{sys.version_info[0]}{sys.version_info[1]}")
    if not os.path.isdir(os.path.join(target, "deap")):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--target", target, DEAP_13], capture_output=True, text=True,
                              timeout=180)
        if proc.returncode != 0:
            pytest.skip(f"could not install {DEAP_13} from the package index: "
                        f"{proc.stderr.strip()[-300:]}")
    check = subprocess.run([sys.executable, "-c", "import deap; print(deap.__version__)"],
                           capture_output=True, text=True, env={**os.environ,
                                                                "PYTHONPATH": target})
    assert check.stdout.strip() == "1.3", check
    return target


def test_corpus_found():
    found = {f[:-3] for f in os.listdir(CORPUS) if f.endswith(".py")}
    assert set(SEEDED) | {"islands_easimple"} <= found


@pytest.mark.parametrize("program", SEEDED)
def test_same_answer_serial_and_parallel(program):
    serial = run(program)
    assert run(program, "-n", "1") == serial
    assert run(program, "-n", "2") == serial


@pytest.mark.parametrize("program", SEEDED)
def test_same_answer_on_deap_13(program, deap_13):
    serial = run(program, pythonpath=deap_13)
    assert run(program, "-n", "2", pythonpath=deap_13) == serial


@pytest.mark.parametrize("pythonpath", ["installed", "1.3"])
def test_deaps_own_scoop_island_example(pythonpath, request):
    """Whole ``eaSimple`` runs as tasks, with the toolbox sent along: the individuals found
    depend on timing, so the program checks their shape and evaluations itself."""
    path = request.getfixturevalue("deap_13") if pythonpath == "1.3" else None
    expected = "islands_easimple: 5 islands of 100, every individual evaluated"
    assert run("islands_easimple", "-n", "2", pythonpath=path).strip() == expected
    assert run("islands_easimple", "-n", "3", pythonpath=path).strip() == expected
