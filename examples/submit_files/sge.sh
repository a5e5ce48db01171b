#!/bin/bash
# A scoop job under Sun/Son of/Univa Grid Engine: qsub sge.sh
#$ -N scoop-job
#$ -pe smp 16
#$ -l h_rt=00:10:00
#$ -cwd
#$ -S /bin/bash
#$ -notify

# scoop reads $PE_HOSTFILE (host slots queue processors).
python -m scoop -v examples/full_tree.py
