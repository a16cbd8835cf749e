#!/usr/bin/env bash
# Train and export the shipped pretrained model, mri_vqvae/pretrained_models/brain64_cohort:
#   kit (with the MS cohort, T1w/T2w/FLAIR) -> brain64 VQ-VAE, 8,800 steps -> encode every case
#   plus 6 augmented views of each train case -> contrast-conditioned PixelCNN prior (demo-sized),
#   1,500 steps -> evaluate on the test split -> export.
# One torch thread per stage, as the shipped model was trained. About 60 CPU-minutes for the
# VQ-VAE and 28 for the prior on a CPU with native bf16 (precision auto); on a CPU without it,
# auto trains in fp32, so the weights differ (docs/benchmarks.md: "The shipped pretrained model").
# Usage: [EXPORT_TO=DIR] bash scripts/train_pretrained.sh [RUNS_ROOT]   (default runs/pretrained)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs/pretrained}
mv=.venv/bin/mri-vqvae
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export MRI_VQVAE_KIT_MIRROR=${MRI_VQVAE_KIT_MIRROR:-../shared/mri/open_ms_longitudinal}

manifest=$($mv data kit --config brain64 | sed -n 's/^kit ready: //p')
$mv train-vqvae --manifest "$manifest" --config brain64 --runs-root "$root" \
  --set train_vqvae.max_steps=8800 --set train_vqvae.time_limit_minutes=null
vqvae=$(ls -d "$root"/vqvae/*/ | tail -1)
$mv encode --vqvae "$vqvae" --manifest "$manifest" --out "$root/latents" --augment 6
$mv train-prior --latents "$root/latents" --config demo --runs-root "$root" \
  --set prior.label_field=modality --set train_prior.lr=0.001 \
  --set train_prior.max_steps=1500 --set train_prior.time_limit_minutes=null \
  --set train_prior.val_every=250 --set train_prior.checkpoint_every=250
prior=$(ls -d "$root"/prior/*/ | tail -1)
$mv evaluate --vqvae "$vqvae" --prior "$prior" --manifest "$manifest" --max-train-cases 8 \
  --out "$root/eval"
# EXPORT_TO=mri_vqvae/pretrained_models/brain64_cohort replaces the shipped model (--force replaces
# only an earlier export).
$mv export "$prior" --out "${EXPORT_TO:-$root/export}" --metrics "$root/eval/metrics.json" --force
