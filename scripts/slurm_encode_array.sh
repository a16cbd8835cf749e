#!/usr/bin/env bash
# Encode a large manifest as a SLURM job array, one part of the cases per array task, then merge.
#
# Each task runs `mri-vqvae encode --part I/N` into the same --out: task I-1 of N encodes the
# contiguous share of the sorted cases that rank I-1 of a torchrun world of N would, writes its
# <case_id>.npy grids and journals its entries under OUT/parts/I-of-N/ (its own lock and
# records: tasks never write the same file). A task that is pre-empted or fails is simply
# resubmitted with the same index: it keeps every grid that still verifies. When every task has
# finished, `mri-vqvae merge OUT` writes index.json and failures.csv exactly as one process would
# (it refuses, naming them, while parts are missing or still running).
#
# Usage (edit the paths; the partition, time and memory lines to your cluster):
#
#   VQVAE=runs/vqvae/<run> MANIFEST=manifest.json OUT=runs/latents/<run> \
#     sbatch --array=0-15 scripts/slurm_encode_array.sh     # 16 parts
#   # then, once the array is done (or chain it: sbatch --dependency=afterok:<jobid> ...):
#   mri-vqvae merge runs/latents/<run>
#
#SBATCH --job-name=mri-vqvae-encode
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=logs/encode_%A_%a.log

set -euo pipefail

: "${VQVAE:?set VQVAE to the VQ-VAE run folder}"
: "${MANIFEST:?set MANIFEST to the manifest JSON}"
: "${OUT:?set OUT to the latents folder}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-(N-1)}"
: "${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=0-(N-1)}"

export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
PART="$((SLURM_ARRAY_TASK_ID + 1))/${SLURM_ARRAY_TASK_COUNT}"

# Cluster logs are not terminals: progress comes as one log line every 30 s (done/total, rate, ETA).
mri-vqvae encode --vqvae "$VQVAE" --manifest "$MANIFEST" --out "$OUT" --device auto \
  --part "$PART" ${SPLIT:+--split "$SPLIT"}

# The merge, as its own job after the whole array succeeded:
#   ARRAY=$(sbatch --parsable --array=0-15 scripts/slurm_encode_array.sh)
#   sbatch --dependency=afterok:"$ARRAY" --wrap "mri-vqvae merge $OUT"
