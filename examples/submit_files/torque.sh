#!/bin/bash
# A scoop job under PBS/Torque: qsub torque.sh
#PBS -l nodes=2:ppn=8
#PBS -l walltime=00:10:00
#PBS -N scoop-job
#PBS -V

cd "$PBS_O_WORKDIR"
# scoop reads $PBS_NODEFILE (one line per slot): 8 workers on each node.
python -m scoop -v examples/full_tree.py
