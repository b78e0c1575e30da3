#!/usr/bin/env bash
# The part of the published protocols that fits ten minutes of one large GPU (an H100/H200-class card), written as the
# same results files the CPU runs write. bf16 autocast is picked by `precision: auto`; the presize cache holds every image
# decoded once (the page cache then serves them from memory); DataLoader workers default to all cores.
#
#   BLOODCELL_DATA=/path/to/data bash studies/gpu/run.sh        # data: pbc/ (all 17,092 images)
#
# What runs, in this order (each step is resumable: run the script again and finished runs are skipped):
#   1. ryba_2021: ResNet-18 and ResNet-34, ImageNet weights, gradual unfreezing, 224 px, all of PBC (8:1:1)
#   2. foix_romero_2022: the tiny and small training sets (200 / 2,100 images), every architecture, the published
#      SGD + ReduceLROnPlateau + early-stopping recipe, and the linear probes on tiny
# On Colab (one T4) the same commands take roughly 10x longer (estimate, not measured).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${BLOODCELL_DATA:?set BLOODCELL_DATA to the folder that holds pbc/ (see README: Data)}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: this script is for a GPU machine (the CPU configs are studies/*_cpu.json)')"
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
LIMIT=${LIMIT:-540}   # seconds for all steps together; what is left unfinished resumes on the next call
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" 2>/dev/null || true
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
step() { # name, extra args
  local name=$1; shift
  local t; t=$(left); if [ "$t" -le 30 ]; then echo "skipped $name: the time limit is spent"; return 0; fi
  timeout "$t" bloodcell study "studies/$name.json" --out "$OUT/$name" "$@" || echo "$name stopped (time limit or error): run again to resume"
  if [ -f "$OUT/$name/results.csv" ]; then cp "$OUT/$name/results.csv" "studies/results/${name}_gpu.csv"; echo "wrote studies/results/${name}_gpu.csv"; fi
}
step ryba_2021 --only resnet
step foix_romero_2022 --only tiny/
step foix_romero_2022 --only small/
echo "GPU: $(cat "$OUT/gpu.txt" 2>/dev/null || echo unknown); $(( $(date +%s) - start )) s"
