#!/bin/bash
# PBS/Torque: the same loop without a warning signal: --walltime tells the launcher the
# job's time, and it drains --grace seconds before it. qsub pbs_requeue.sh
#PBS -N scoop-long
#PBS -l nodes=2:ppn=8
#PBS -l walltime=01:00:00
#PBS -r y

cd "$PBS_O_WORKDIR"
python -m scoop --walltime 00:57:00 --grace 90 my_long_map.py
status=$?
if [ "$status" -eq 75 ]; then
    qrerun "$PBS_JOBID"     # back in the queue; the next run resumes the checkpoint
fi
exit "$status"
