#!/usr/bin/env bash
# The checks run on a lent GPU machine (torch, no vLLM, no network): the trainer step profiled against the
# bare loop, the trainer bench line, and `mindgap doctor` (records + train steps). docs/gpu.md has results.
#
# Prepared on this machine (the GPU machine fetches nothing):
#   .whl/      mindgap's wheel and the pure-Python/cp312 wheels the image lacks (deepspeed, pydantic, trl, ...)
#   .gpu/smollm2-src/   SmolLM2-135M's config and tokenizer (the weights are drawn at random there)
#   .gpu/data/gsm8k/train.jsonl   the first GSM8K problems
# Run there from the repository root, after installing the wheels into a folder on PYTHONPATH:
#   bash bench/gpu_check.sh OUT_DIR            (CHECKS="profile bench" runs a subset)
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
model=/tmp/SmolLM2-135M-random-weights
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
$py - "$model" <<'EOF'
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

src, dst = ".gpu/smollm2-src", sys.argv[1]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
print("random-weight model at", dst, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
EOF

checks=${CHECKS:-profile bench doctor}
step() { echo "=== $1 ($(date -u +%T))"; [[ " $checks " == *" $1 "* ]]; }
if step profile; then
$py experiments/trainer_profile/profile_step.py --model "$model" --data-dir .gpu/data --out "$out/profile" \
    --batch "${BATCH:-8}" --seq-len "${SEQ_LEN:-512}" --steps "${STEPS:-10}" --profiled 3 2>&1 | grep -v -i warn || true
fi
if step bench; then
$py -m mindgap bench --only trainer --model "$model" --data-dir .gpu/data --repeat "${STEPS:-10}" \
    --out "$out/bench" 2>&1 | tail -20 || true
fi
if step doctor; then
$py -m mindgap doctor --model "$model" --json "$out/doctor.json" 2>&1 | grep -v -i warn | tail -12 || true
fi
echo "=== done ($(date -u +%T))"
