#!/usr/bin/env bash
# Prepare, on this machine, what the GPU device calls need and cannot fetch there (the device has no network):
#   .carry/          the golden checkpoint and its check             -> gpu_check.sh engine
#   .carry_official/ the official BAGEL and IRG code (from the mirrors the `fetch` tool makes of
#                    ByteDance-Seed/Bagel and Osilly/Interleaving-Reasoning-Generation), the wheels it needs
#                    (transformers 4.49), ../shared/bench's script and SDPA shim, a tokenizer -> gpu_check.sh official
# Both folders are git-ignored; nothing fetched is committed. Then, with the device tool, back to back:
#   run(command="bash benchmarks/gpu_check.sh engine", carry=[".carry"], timeout_s=540)
#   run(command="bash benchmarks/gpu_check.sh official", carry=[".carry_official"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${IRG_SHARED_DIR:-../shared}"
for d in /.carry/ /.carry_official/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .carry && mkdir -p .carry
cp -r "$shared/golden/tiny_bagel_a" .carry/golden
cp "$shared/checks/golden_check.py" .carry/
du -sh .carry

# The official comparison: pinned commits of the official code (the ones ../shared/bench was measured with).
mirror="${IRG_MIRROR_DIR:-/work/.mirror}"
bagel="$mirror/ByteDance-Seed+Bagel/repo" irg="$mirror/Osilly+Interleaving-Reasoning-Generation/repo"
if [ ! -d "$bagel" ] || [ ! -d "$irg" ]; then
  echo "no mirror of the official code under $mirror: fetch github:ByteDance-Seed/Bagel and" \
       "github:Osilly/Interleaving-Reasoning-Generation first (or set IRG_MIRROR_DIR); .carry_official not made" >&2
  exit 0
fi
c=.carry_official
rm -rf "$c" && mkdir -p "$c/bagel_src/irg" "$c/tok" "$c/whl"
git --git-dir "$bagel" archive 056b5fd5 modeling data inferencer.py | tar -x -C "$c/bagel_src"
git --git-dir "$irg" show 3eee315f:eval/multi_turn/tiif/tiif_multi_turn_gen.py > "$c/bagel_src/irg/tiif_multi_turn_gen.py"
cp "$shared/bench/bench_official.py" "$c/" && cp -r "$shared/bench/shim_sdpa" "$c/"
golden="$shared/golden/tiny_bagel_a"
cp "$golden/case.json" "$golden"/model/{tokenizer.json,tokenizer_config.json,vocab.json,merges.txt} "$c/tok/"
cp "$golden"/model/*_config.json "$c/tok/"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$c/whl" transformers==4.49.0 tokenizers==0.21.4 huggingface_hub==0.36.2
du -sh "$c"
