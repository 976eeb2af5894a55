#!/usr/bin/env bash
# Every GPU check of the engine in one device call (see benchmarks/prepare_device.sh). Writes to $OUT.
#   1. the golden trajectory on the GPU (bfloat16 weights, as the official code runs) against the official numbers
#   2. the decode step: CUDA graph == eager tokens on the golden model; full-size ms/token at batch 1 and 8
#   3. irg bench at the full BAGEL-7B-MoT shapes with dummy weights: IRG (1024^2, 50 steps, 256-token thoughts)
#      and one BAGEL image (direct), with the SDPA and the paged varlen attention backends
#   4. IRG at concurrency 1, 4 and 8 (512^2, 20 steps, 64-token thoughts, to fit the device budget)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/irg-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
bin=$(mktemp -d); printf '#!/bin/sh\nexec python3 -m server.cli "$@" --device cuda\n' > "$bin/irg"; chmod +x "$bin/irg"
PATH="$bin:$PATH" python3 .carry/golden_check.py .carry/golden 2>&1 | tee "$OUT/golden_cuda.txt"
python3 benchmarks/gpu_decode.py .carry/golden 2>&1 | tee "$OUT/decode.txt"
full="--dummy-weights irg_core/data/bagel_7b_mot.json --tokenizer-dir .carry/golden/model --device cuda"
for attn in sdpa varlen; do
  python3 -m server.cli bench $full --attention $attn --mode irg --width 1024 --height 1024 --steps 50 \
    --max-think-tokens 256 --json "$OUT/bench_irg_$attn.json" 2>&1 | tee "$OUT/bench_irg_$attn.txt"
  python3 -m server.cli bench $full --attention $attn --mode direct --width 1024 --height 1024 --steps 50 \
    --json "$OUT/bench_direct_$attn.json" 2>&1 | tee "$OUT/bench_direct_$attn.txt"
done
for n in 4 8; do
  python3 -m server.cli bench $full --mode irg --width 512 --height 512 --steps 20 --max-think-tokens 64 \
    --concurrency $n --no-warmup --json "$OUT/bench_concurrency_$n.json" 2>&1 | tee "$OUT/bench_concurrency_$n.txt"
done
