#!/bin/bash
# A scoop job under SLURM: sbatch slurm.sh
#SBATCH --job-name=scoop-job
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --time=00:10:00

# Activate the environment that has scoop (the same path must exist on every node);
# remote nodes get it through --prolog.
# source "$HOME/venvs/scoop/bin/activate"

cd "$SLURM_SUBMIT_DIR"
# scoop reads SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE: 8 workers on each node.
python -m scoop -v examples/full_tree.py
# with an environment to activate on the other nodes:
# python -m scoop -v --prolog "$HOME/venvs/scoop/bin/activate" examples/full_tree.py
