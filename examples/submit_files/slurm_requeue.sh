#!/bin/bash
# A long scoop job that outlives its wall-time limit: sbatch slurm_requeue.sh
#
# 120 s before the limit SLURM sends SIGUSR1 to this script (B:); the trap passes it to
# the launcher, which starts no more tasks, gives running ones --grace seconds, then
# stops the program: a checkpointed map (futures.map(..., checkpoint="run.db")) has
# recorded every finished result, and the launcher exits with 75. The script then puts
# the job back in the queue; its next run computes only what is left.
#SBATCH --job-name=scoop-long
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append

cd "$SLURM_SUBMIT_DIR"
python -m scoop --grace 90 my_long_map.py &
launcher=$!
trap 'kill -USR1 "$launcher"' USR1
wait "$launcher"            # returns early when the trap runs ...
status=$?
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher"        # ... so wait again for the launcher's own status
    status=$?
done
if [ "$status" -eq 75 ]; then
    echo "time is up: requeueing (run ${SLURM_RESTART_COUNT:-0})"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
