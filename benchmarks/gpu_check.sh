#!/usr/bin/env bash
# Every GPU check of the engine, in two device calls (see benchmarks/prepare_device.sh). Writes to $OUT.
#   bash benchmarks/gpu_check.sh engine     (carry .carry: the golden checkpoint)
#   1. the golden trajectory on the GPU (bfloat16 weights, as the official code runs) against the official numbers
#   2. the decode step: CUDA graph == eager tokens on the golden model; full-size ms/token at batch 1 and 8
#   3. irg bench at the full BAGEL-7B-MoT shapes with dummy weights: IRG (1024^2, 50 steps, 256-token thoughts)
#      and one BAGEL image (direct), with the SDPA and the paged varlen attention backends
#   4. IRG at concurrency 1, 4 and 8 (512^2, 20 steps, 64-token thoughts, to fit the device budget)
#   bash benchmarks/gpu_check.sh official   (carry .carry_official: the official code, its wheels, a tokenizer)
#   5. ../shared/bench/bench_official.py (the official BAGEL + IRG code, full size, random weights) and irg bench at
#      the same shapes in the same call, then benchmarks/compare_official.py: speed-up per stage and the targets
# The golden checkpoint alone nearly fills a call's 64 MiB carry, hence two calls (run them back to back: the
# machine stays warm between them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/irg-out}; mkdir -p "$OUT"
part=${1:-engine}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if [ "$part" = official ]; then
  c=.carry_official
  site=$(mktemp -d)  # transformers 4.49 for the official code only; ours keeps the machine's own
  python3 -m pip install -q --no-deps --no-index --target "$site" "$c"/whl/*.whl
  PYTHONPATH="$site" python3 "$c/bench_official.py" --bagel-src "$c/bagel_src" --tokenizer-dir "$c/tok" \
    --case "$c/tok/case.json" --mode both --dispatch none --resolution 1024 --timesteps 50 --think-tokens 256 \
    --ceilings --out "$OUT/official_bench.json" 2>&1 | tee "$OUT/official.txt"
  full="--dummy-weights irg_core/data/bagel_7b_mot.json --tokenizer-dir $c/tok --device cuda"
  python3 -m server.cli bench $full --mode irg --width 1024 --height 1024 --steps 50 --max-think-tokens 256 \
    --json "$OUT/ours_irg.json" 2>&1 | tee "$OUT/ours_irg.txt"
  python3 -m server.cli bench $full --mode direct --width 1024 --height 1024 --steps 50 \
    --json "$OUT/ours_direct.json" 2>&1 | tee "$OUT/ours_direct.txt"
  python3 benchmarks/compare_official.py "$OUT/official_bench.json" "$OUT/ours_irg.json" "$OUT/ours_direct.json" \
    | tee "$OUT/compare_official.txt"
  exit 0
fi
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
