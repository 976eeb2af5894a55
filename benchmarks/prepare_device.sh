#!/usr/bin/env bash
# Prepare, on this machine, what a GPU device call needs and cannot fetch there: the tokenizer and the golden
# checkpoint (copied into the git-ignored .carry/). Then run, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${IRG_SHARED_DIR:-../shared}"
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
rm -rf .carry && mkdir -p .carry
cp -r "$shared/golden/tiny_bagel_a" .carry/golden
cp "$shared/checks/golden_check.py" .carry/
du -sh .carry
