#!/usr/bin/env bash
# Every GPU check of the engine, in two device calls (see benchmarks/prepare_device.sh).
#   bash benchmarks/gpu_check.sh engine     (carry .carry: the golden checkpoint)
#   1. pytest -m gpu tests/gpu: every SDPA call shape reaches a fused kernel; each other attention backend agrees
#      with sdpa on the golden model (skipped, with the reason, when its package cannot run here)
#   2. the golden trajectory on the GPU (bfloat16 weights, as the official code runs) against the official numbers
#   3. the decode step: CUDA graph == eager tokens on the golden model; full-size ms/token at batch 1 and 8
#   4. irg bench at the full BAGEL-7B-MoT shapes with dummy weights: IRG (1024^2, 50 steps, 256-token thoughts)
#      and one BAGEL image (direct), with the SDPA and the paged varlen attention backends
#   5. IRG at concurrency 4 and 8 (512^2, 20 steps, 64-token thoughts, to fit the device budget)
#   bash benchmarks/gpu_check.sh official   (carry .carry_official: the official code, its wheels, a tokenizer)
#   6. ../shared/bench/bench_official.py (the official BAGEL + IRG code, full size, random weights) and irg bench at
#      the same shapes in the same call, then benchmarks/compare_official.py: speed-up per stage and the targets
# The golden checkpoint alone nearly fills a call's 64 MiB carry, hence two calls (run them back to back: the
# machine stays warm between them). At most 8 files come back from $OUT, so each part writes two: everything
# printed to $OUT/<part>.log, and every JSON record, merged after each step, to $OUT/<part>.json (a step cut
# off by the time limit leaves the earlier ones in both). The GPU machines carry PyTorch but not the server's
# packages; the commands used here do not need them (tests/bench/test_device_imports.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/irg-out}; mkdir -p "$OUT"
part=${1:-engine}
log="$OUT/$part.log"; rec=$(mktemp -d)
step() {  # step TITLE COMMAND...: run COMMAND, its output into the log, then merge every JSON record written
  echo "== $1" | tee -a "$log"; shift      # under $rec so far, by file name, into $OUT/$part.json
  "$@" 2>&1 | tee -a "$log"
  python3 -c 'import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); json.dump({p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}, open(sys.argv[2], "w"), indent=1)' "$rec" "$OUT/$part.json"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"

if [ "$part" = official ]; then
  c=.carry_official
  site=$(mktemp -d)  # transformers 4.49 for the official code only; ours keeps the machine's own
  python3 -m pip install -q --no-deps --no-index --target "$site" "$c"/whl/*.whl 2>&1 | tee -a "$log"
  step "official code: bench_official.py" env PYTHONPATH="$site" python3 "$c/bench_official.py" \
    --bagel-src "$c/bagel_src" --tokenizer-dir "$c/tok" --case "$c/tok/case.json" --mode both --dispatch none \
    --resolution 1024 --timesteps 50 --think-tokens 256 --ceilings --out "$rec/official_bench.json"
  full="--dummy-weights irg_core/data/bagel_7b_mot.json --tokenizer-dir $c/tok --device cuda"
  step "ours: irg bench, irg" python3 -m server.cli bench $full --mode irg --width 1024 --height 1024 --steps 50 \
    --max-think-tokens 256 --json "$rec/ours_irg.json"
  step "ours: irg bench, direct" python3 -m server.cli bench $full --mode direct --width 1024 --height 1024 \
    --steps 50 --json "$rec/ours_direct.json"
  step "official vs ours" python3 benchmarks/compare_official.py "$rec/official_bench.json" "$rec/ours_irg.json" \
    "$rec/ours_direct.json"
  exit 0
fi
export IRG_GOLDEN_MODEL=$PWD/.carry/golden/model
step "pytest -m gpu tests/gpu" python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rs -s
bin=$(mktemp -d); printf '#!/bin/sh\nexec python3 -m server.cli "$@" --device cuda\n' > "$bin/irg"; chmod +x "$bin/irg"
step "golden trajectory on CUDA" env PATH="$bin:$PATH" python3 .carry/golden_check.py .carry/golden
step "decode step: graph vs eager, ms/token" env OUT="$rec" python3 benchmarks/gpu_decode.py .carry/golden
full="--dummy-weights irg_core/data/bagel_7b_mot.json --tokenizer-dir .carry/golden/model --device cuda"
for attn in sdpa varlen; do
  step "irg bench, irg, $attn" python3 -m server.cli bench $full --attention $attn --mode irg --width 1024 \
    --height 1024 --steps 50 --max-think-tokens 256 --json "$rec/bench_irg_$attn.json"
  step "irg bench, direct, $attn" python3 -m server.cli bench $full --attention $attn --mode direct --width 1024 \
    --height 1024 --steps 50 --json "$rec/bench_direct_$attn.json"
done
for n in 4 8; do
  step "irg bench, concurrency $n" python3 -m server.cli bench $full --mode irg --width 512 --height 512 \
    --steps 20 --max-think-tokens 64 --concurrency $n --no-warmup --json "$rec/bench_concurrency_$n.json"
done
