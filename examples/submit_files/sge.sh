#!/bin/bash
# A scoop job under Sun/Son of/Univa Grid Engine: qsub sge.sh
#$ -N scoop-job
#$ -pe mpi 16
#$ -l h_rt=00:10:00
#$ -cwd
#$ -S /bin/bash

# The parallel environment's name is your cluster's: pick one whose allocation_rule
# spreads the slots over hosts ($fill_up, $round_robin or a number; `qconf -sp NAME`).
# An "smp" PE ($pe_slots) keeps them all on one host. scoop reads $PE_HOSTFILE (host
# slots queue processors) and starts the other hosts' workers over ssh.
# No "-notify": it sends SIGUSR1 before a suspension and SIGUSR2 before a kill, and the
# launcher does not catch them yet, so a suspended job would end.
python -m scoop -v examples/full_tree.py
