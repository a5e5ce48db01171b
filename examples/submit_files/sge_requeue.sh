#!/bin/bash
# Grid Engine: --walltime from h_rt; exit status 99 asks Grid Engine to requeue the job.
# qsub sge_requeue.sh
#$ -N scoop-long
#$ -pe mpi 16
#$ -l h_rt=01:00:00
#$ -cwd
#$ -r y

python -m scoop --walltime 00:57:00 --grace 90 my_long_map.py
status=$?
if [ "$status" -eq 75 ]; then
    exit 99                 # Grid Engine: put this job back in the queue
fi
exit "$status"
