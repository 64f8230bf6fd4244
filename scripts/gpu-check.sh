#!/usr/bin/env bash
# What only a GPU can show, in one short run (about 8 minutes on one GPU): the rehearsal sweep
# (ablations/temporal_modules.yaml, 2 packs of 8 ViT-B/16 decoders) on 1 GPU under float16 and
# bfloat16 autocast, `bench step` and `bench infer` on ViT-B/16 (paper Tables 5 and 3, each
# with its out-of-memory search for the largest batch), a pack's "learns exactly as alone"
# check on CUDA, `bench data` on the rehearsal videos (loader vs raw decoding; RandAugment's
# batched kernels timed on the GPU) and the training loop's device discipline
# (scripts/gpu_check_train.py). Ends with one summary table: PASS/FAIL/SKIP and the key number
# per check.
#
#   scripts/gpu-check.sh          # on a machine with a CUDA GPU
#   scripts/gpu-check.sh --cpu    # the same checks on the CPU, minus the AMP sweeps (CPUs
#                                 # ignore train.amp): the script and its commands still work
#
# Uses .venv (README: `pip install -c constraints.txt -e ".[dev]"`) when it exists, else the
# python on PATH. Logs and stores go to $GPU_CHECK_DIR (default .gpu-check/); the stand-in
# videos to $EVL_PLATFORM_CACHE (default .gpu-check/cache). Exit status: 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
DIR=$(realpath -m "${GPU_CHECK_DIR:-.gpu-check}")
mkdir -p "$DIR"
export EVL_PLATFORM_CACHE=${EVL_PLATFORM_CACHE:-$DIR/cache}
PY=python
EVL=(python -m evl_platform.cli)
SUMMARY=()
FAILED=0

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEVICE=cuda
else
  DEVICE=none
fi
if [[ $MODE == gpu && $DEVICE != cuda ]]; then
  echo "gpu-check: no CUDA device visible to torch; run with --cpu for the CPU-safe parts" >&2
  exit 2
fi
TARGET=$([[ $MODE == gpu ]] && echo cuda || echo cpu)
echo "gpu-check: mode $MODE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), logs in $DIR"
if [[ $MODE == gpu ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi

# figure KIND LOG: the figure a check's log gives (KIND: sweep, step, infer, data or last).
figure() {
  $PY - "$1" "$2" <<'EOF' 2>/dev/null || echo "-"
import json, re, sys
kind, log = sys.argv[1], open(sys.argv[2]).read()
if kind == "sweep":  # the sweep's last summary line
    found = re.findall(r"^.*\b(?:runs?|finished|wall)\b.*$", log, re.M)
    print(found[-1].strip()[:90] if found else log.strip().splitlines()[-1][:90])
elif kind == "step":
    results = json.loads(log[log.index("{"):])["results"]
    print(", ".join(
        f"{r['backbone']}/{r['head']} {r['step_time_s'] or float('nan'):.2f} s"
        f" (max batch {r['max_batch']['value']})" for r in results))
elif kind == "infer":
    d = json.loads(log[log.index("{"):])
    print(f"{d['gflops_per_video']:.0f} GFLOPs/video, {d['latency_ms']:.0f} ms/video, "
          f"{d['throughput_videos_per_s']:.2f} videos/s, max batch {d['max_batch']['value']}")
elif kind == "data":  # the loader ratio and the device augmentation's time per clip
    ratio = re.search(r"ratio\s+([\d.]+)", log).group(1)
    device = re.search(r"batched torch kernels ([\d.]+ ms/clip on .*)", log)
    print(f"loader/raw {ratio}; RandAugment {device.group(1) if device else '-'}"[:90])
else:
    print(log.strip().splitlines()[-1][:90])
EOF
}

# check NAME KIND COMMAND...: runs COMMAND, logs to $DIR/NAME.log, records PASS/FAIL, the
# seconds it took and its figure (see `figure`).
check() {
  local name=$1 kind=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS status=PASS
  if ! "$@" >"$DIR/$name.log" 2>&1; then status=FAIL; FAILED=1; fi
  tail -n 25 "$DIR/$name.log"
  SUMMARY+=("$(printf '%-24s %-5s %6ss  %s' "$name" "$status" $((SECONDS - start)) \
    "$(figure "$kind" "$DIR/$name.log")")")
}

skip() {
  echo "== $1: skipped ($2)"
  SUMMARY+=("$(printf '%-24s %-5s %6s   %s' "$1" SKIP - "$2")")
}

# The rehearsal ablation with its resources on one GPU (the file's rehearsal overlay asks for
# two CPU cores, as on the 2-core box it was written for).
gpu_ablation() {
  $PY - "$DIR/temporal_modules_gpu.yaml" <<'EOF'
import sys
from pathlib import Path
import yaml
source = Path("ablations/temporal_modules.yaml").resolve()
spec = yaml.safe_load(source.read_text())
spec["experiments"] = {k: str((source.parent / v).resolve()) for k, v in spec["experiments"].items()}
rehearsal = spec["profiles"]["rehearsal"]
rehearsal["resources"] = {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4}
Path(sys.argv[1]).write_text(yaml.safe_dump(spec, sort_keys=False))
EOF
  echo "$DIR/temporal_modules_gpu.yaml"
}

if [[ $MODE == gpu ]]; then
  ABLATION=$(gpu_ablation)
  for amp in float16 bfloat16; do
    check "sweep-rehearsal-$amp" sweep \
      "${EVL[@]}" sweep "$ABLATION" --profile rehearsal --max-concurrent 1 \
      --set train.amp=$amp --set model.backbone.dtype=$amp \
      --tracking-uri "sqlite:///$DIR/sweep-$amp.db" --storage-path "$DIR/sweep-$amp"
  done
else
  skip sweep-rehearsal-amp "CPUs ignore train.amp; run the CPU sweep with: evl-platform sweep ablations/temporal_modules.yaml --profile rehearsal"
fi

DTYPE=$([[ $MODE == gpu ]] && echo float16 || echo float32)
ITERS=$([[ $MODE == gpu ]] && echo 10 || echo 1)
BATCH=()
if [[ $MODE == cpu ]]; then BATCH=(--batch 1); fi
check bench-step-vitb16 step \
  "${EVL[@]}" bench step experiments/k400_vitb16_8f.yaml --profile rehearsal \
  --set model.backbone.dtype=$DTYPE --device $TARGET --iters $ITERS "${BATCH[@]}" --json --no-track
check bench-infer-vitb16 infer \
  "${EVL[@]}" bench infer experiments/k400_vitb16_8f.yaml --profile rehearsal \
  --set model.backbone.dtype=$DTYPE --device $TARGET --iters $ITERS "${BATCH[@]}" --json --no-track

if [[ $MODE == gpu ]]; then
  for amp in float16 bfloat16; do
    check "pack-parity-$amp" last \
      $PY scripts/gpu_pack_parity.py --device cuda --amp $amp
  done
else
  check pack-parity-cpu last \
    $PY scripts/gpu_pack_parity.py --device cpu --amp none
fi

# The loader against raw decoding on the rehearsal videos, and RandAugment's batched kernels
# timed on the device (data.augment.on: device) against the loader's numpy kernels.
check bench-data-rehearsal data \
  "${EVL[@]}" bench data experiments/k400_vitb16_8f.yaml --profile rehearsal --clips 48 \
  --workers "$(python -c 'import os; print(max(1, min(8, len(os.sched_getaffinity(0)) - 1)))')"

# The training loop on the device: no host sync between logging steps (sync debug mode
# "error"), and the CUDA RNG state saved and restored on the worker's own device.
check train-loop-$TARGET last env PYTHONPATH=. $PY scripts/gpu_check_train.py

echo
echo "gpu-check summary ($MODE)"
printf '%-24s %-5s %7s  %s\n' check result time figure
for line in "${SUMMARY[@]}"; do echo "$line"; done
exit $FAILED
