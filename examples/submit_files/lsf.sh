#!/bin/bash
# A scoop job under IBM Spectrum LSF: bsub < lsf.sh
#BSUB -J scoop-job
#BSUB -n 16
#BSUB -R "span[ptile=8]"
#BSUB -W 00:10

cd "$LS_SUBCWD"
# scoop reads $LSB_MCPU_HOSTS ("hostA 8 hostB 8").
python -m scoop -v examples/full_tree.py
