#!/usr/bin/env bash
# The one prepared call for a lent GPU (issue 20): install the carried wheels, then
# benchmarks/ppo_gpu.py (the CUDA-graph decode checked against the eager loop, the
# memory-bandwidth floor, decode ms/token per path and batch, the PPO step split at batch 8
# (graph and eager), 32 and 64), with GPU utilisation sampled every 200 ms alongside.
# Everything lands in $OUT: ppo_gpu.log, ppo_gpu.json, gpu_utilisation.csv.
#
# The device image has PyTorch, but older transformers/peft/accelerate than this project pins and no
# network, so the pinned ones travel as wheels (16 wheels, 20 MB with their missing dependencies):
#
#   bash benchmarks/gpu_session.sh --download        # here, with PyPI: fills .whl/ (git-ignored)
#   # then one device call: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Extra arguments after the script name go to benchmarks/ppo_gpu.py (for example --ppo_epochs 1 when
# time is short). The script's own budget (--time_budget_s 420) leaves room for the start-up.
set -uo pipefail
cd "$(dirname "$0")/.."

# Pinned as in the project's tested environment; the image's own torch, numpy, safetensors,
# tokenizers, pyyaml, tqdm, psutil, filelock, fsspec, packaging, typing-extensions and hf-xet are used.
WHEELS=(
  transformers==5.25.0 huggingface_hub==2.4.0 peft==0.21.2 accelerate==1.16.0 kernels==0.19.1
  httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 idna==3.21 anyio==4.16.0 h11==0.16.0
  sniffio==1.3.1 certifi==2026.10.19.post1 tomlkit==0.14.0 click==8.5.1 regex==2026.12.2
)

if [[ "${1:-}" == "--download" ]]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  mkdir -p .whl
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
fi

OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  echo "no .whl/ carried: using the image's packages"
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 200 > "$OUT/gpu_utilisation.csv" 2>/dev/null &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null' EXIT

python3 benchmarks/ppo_gpu.py --json "$OUT/ppo_gpu.json" --time_budget_s 420 "$@" 2>&1 | tee "$OUT/ppo_gpu.log"
status=${PIPESTATUS[0]}
kill $SAMPLER 2>/dev/null
python3 - "$OUT/gpu_utilisation.csv" <<'EOF'
import csv, statistics, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) >= 2 and r[1].strip().endswith("%")]
util = [float(r[1].strip().rstrip(" %")) for r in rows]
if util:
    print(f"GPU utilisation over the run: mean {statistics.mean(util):.0f} %, {len(util)} samples every 200 ms")
EOF
exit "$status"
