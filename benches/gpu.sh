#!/usr/bin/env bash
# The script for a lent GPU machine (PLATFORM.md, "The GPU machine": Python 3.12, torch 2.11 + triton 3.6
# preinstalled, no network; lent ~15 minutes at a time, its start included).  One call is at most 8 minutes.
#
#   benches/gpu.sh OUTDIR [headline]   install the carried wheels, the CUDA tests (tests/test_cuda.py,
#                                      tests/test_cuda_dispersive.py), then the headline shapes: CLIP and SigLIP
#                                      N = 65,536 D = 512 bf16 (reference, triton, open_clip, inf_cl; the bf16
#                                      matmul rate at D = 512), dispersive B = 256 M = 294,912 bf16 (reference,
#                                      triton), each checked against float64 at that shape; then the gate
#   benches/gpu.sh OUTDIR extra        optional second call: torch.compile and the long sweeps, the report
#   benches/gpu.sh --dry-run OUTDIR [PART]   print the steps and their time boxes (any machine)
#   benches/gpu.sh --fetch-wheels      on the CPU machine (network): the peers' wheels for Python 3.12 into
#                                      benches/wheels/ (ignored by git: give it to the run tool's `carry`)
#
# Exit status: non-zero when a step fails (a test, an install, a time box hit), when the gate fails (a Triton
# correctness check above 2x the PyTorch reference's error against float64, a Triton row that raised, or no
# Triton row at all), or when the time boxes of the part add up to more than 480 s.  Every step runs even after
# a failure (the JSON of the others still comes back).  JSON, logs and steps.txt are written into OUTDIR.
#
# Knobs: PYTHON (default python3); GPU_SH_DEVICE=cpu runs the Python parts on the CPU with tiny shapes (the smoke
# test in tests/test_gpu_script.py; fused provider cpp, no install); GPU_SH_FAKE_FAIL=STEP replaces that step by
# `false` (to test the exit status); GPU_SH_BOX_SCALE=K runs every step with K times its box (the budget check
# still adds the nominal boxes).
set -uo pipefail

BUDGET_S=480
DRY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --fetch-wheels)
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    W="$ROOT/benches/wheels"; mkdir -p "$W"
    PIP=${PIP:-"$ROOT/.venv/bin/pip"}
    [ -x "$PIP" ] || PIP="python3 -m pip"
    # pure-python or cp312 manylinux wheels; --no-deps: torch/torchvision/triton/timm/numpy/huggingface_hub are
    # already on the GPU machine (a PyPI torchvision for another CUDA build would break `import torchvision`).
    $PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$W" \
      inf-cl==1.2.1 open-clip-torch==3.3.0 ftfy regex wcwidth tqdm pytorch-metric-learning==2.9.0 || exit 1
    du -sh "$W"; ls -la "$W"; exit 0 ;;
esac
OUT=${1:?usage: benches/gpu.sh [--dry-run] OUTDIR [headline|extra]}
PART=${2:-headline}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEVICE=${GPU_SH_DEVICE:-cuda}
FUSED=triton
[ "$DEVICE" = cpu ] && FUSED=cpp

# Compiled Triton, not the interpreter: 0 rather than unset, since tests/conftest.py setdefaults it to 1.
export TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
# The checkout itself is the package (no build: the C++ extensions are CPU-only and not needed here); the peers'
# wheels are unpacked into build/peers (no change to the machine's site-packages).
PEERS="$ROOT/build/peers"
export PYTHONPATH="$ROOT:$PEERS${PYTHONPATH:+:$PYTHONPATH}"
[ -e "$ROOT/contrastgen/kernels" ] || ln -s ../kernels "$ROOT/contrastgen/kernels"

BOXES=0
SCALE=${GPU_SH_BOX_SCALE:-1}   # stretches every box when run (not the budget check): the CPU smoke on a busy machine
FAILED=()
step() {  # step NAME LIMIT_S CMD... : time-boxed, logged to OUTDIR/NAME.log; a failure is recorded, not fatal
  local name=$1 limit=$2; shift 2
  BOXES=$((BOXES + limit))
  echo "== [$name] (limit ${limit}s) $*"
  [ "$DRY" = 1 ] && return 0
  [ "${GPU_SH_FAKE_FAIL:-}" = "$name" ] && set -- false
  local t0 rc; t0=$(date +%s)
  timeout --signal=INT --kill-after=10 $(( limit * SCALE )) "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== [$name] rc=$rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
  [ "$rc" = 0 ] || FAILED+=("$name (rc=$rc)")
  return 0
}

CLI=("$PY" -c "import sys; from contrastgen.cli import main; sys.exit(main())" bench)
bench() {  # bench NAME LIMIT_S ARGS... : one bench run into OUTDIR; it stops starting cases 30 s before its box
  local name=$1 limit=$2; shift 2
  step "bench_$name" "$limit" "${CLI[@]}" --device "$DEVICE" --out-dir "$OUT" --tag "$name" \
    --time-limit $(( (limit - 30) * SCALE )) --no-progress "$@"
}
if [ "$DEVICE" = cpu ]; then   # the CPU smoke: the same calls on the quick shapes
  SHAPE_CLIP=(--shapes quick --max-n 256); SHAPE_DISP=(--shapes quick --max-n 64)
  PROV_CLIP=reference,cpp,open_clip; PROV_DISP=reference,cpp; BUDGET=0.02
else
  SHAPE_CLIP=(--shape N=65536,D=512); SHAPE_DISP=(--shape B=256,M=294912)
  PROV_CLIP=reference,triton,open_clip,inf_cl; PROV_DISP=reference,triton; BUDGET=0.2
fi

install() {
  if [ "$DEVICE" = cpu ]; then echo "== [install] skipped (CPU smoke)"; return 0; fi
  if [ "$DRY" = 0 ] && [ -f "$ROOT/build/.gpu-installed" ]; then echo "== [install] done earlier on this machine"; return 0; fi
  if [ "$DRY" = 1 ] || ls benches/wheels/*.whl >/dev/null 2>&1; then
    step install_wheels 40 "$PY" -m pip install --no-index --no-deps --target "$PEERS" benches/wheels/*.whl
  else
    echo "== [install_wheels] no benches/wheels/*.whl (carry benches/wheels): open_clip / inf_cl rows will be skipped"
  fi
  step env 20 "$PY" -c "import torch, triton, contrastgen
from contrastgen.ops import backend_available
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')
print('triton backend', backend_available('triton'))
for m in ('open_clip', 'inf_cl'):
    try:
        __import__(m); print(m, 'ok')
    except Exception as e:
        print(m, 'missing:', type(e).__name__, e)"
  [ "$DRY" = 0 ] && mkdir -p "$ROOT/build" && touch "$ROOT/build/.gpu-installed"
  return 0
}

headline() {
  install
  # one step (and time box) per CUDA test file; the Triton compile cache they fill is reused by the benches
  local name f limit
  for f in tests/test_cuda.py:80 tests/test_cuda_dispersive.py:70; do
    limit=${f#*:}; f=${f%:*}; name=$(basename "$f" .py)
    if [ ! -f "$f" ]; then
      step "$name" "$limit" bash -c "echo '$f is missing'; exit 1"
    elif [ "$DEVICE" = cpu ]; then   # skipped without CUDA: pytest's "no tests ran" (5) is fine
      step "$name" "$limit" bash -c '"$0" -m pytest -q -p no:cacheprovider "$1"; rc=$?; [ $rc = 5 ] && rc=0; exit $rc' \
        "$PY" "$f"
    else
      step "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider "$f"
    fi
  done
  bench clip 100 --op clip_loss --dtype bfloat16 --mode fwd,fwd+bwd "${SHAPE_CLIP[@]}" --providers "$PROV_CLIP" \
    --check-shape timed --budget "$BUDGET" --no-plot
  bench siglip 80 --op siglip_loss --dtype bfloat16 --mode fwd,fwd+bwd "${SHAPE_CLIP[@]}" \
    --providers "${PROV_CLIP/,inf_cl/}" --check-shape timed --budget "$BUDGET" --no-plot
  bench dispersive 60 --op dispersive_loss/huge_dim --dtype bfloat16 --mode fwd,bwd,fwd+bwd "${SHAPE_DISP[@]}" \
    --providers "$PROV_DISP" --check-shape timed --budget "$BUDGET" --no-plot
  step gate 15 "$PY" -m benches.gpu_gate "$OUT" --fused "$FUSED"
}

extra() {
  install
  bench clip_sweep 100 --op clip_loss --dtype bfloat16 --mode fwd,fwd+bwd --budget 0.1 --no-plot
  bench siglip_sweep 80 --op siglip_loss --dtype bfloat16 --mode fwd,fwd+bwd --budget 0.1 --no-plot \
    --providers reference,triton,open_clip
  bench infonce 60 --op info_nce,nt_xent --dtype bfloat16 --mode fwd,fwd+bwd --budget 0.1 --no-plot
  bench dispersive_sweep 60 --op dispersive_loss,uniformity --dtype bfloat16 --mode fwd,bwd,fwd+bwd --budget 0.1 \
    --no-plot
  bench compile 60 --op clip_loss,dispersive_loss/huge_dim --dtype bfloat16 --mode fwd,fwd+bwd \
    --providers reference,compile,triton --shape N=16384,D=512 --shape B=256,M=294912 --budget 0.1 --no-plot
  bench patch 30 --op patch_nce,attention_nce --dtype float32 --mode fwd+bwd --budget 0.1 --no-plot
  step report 15 "$PY" -m benches.report --dir "$OUT" --mode all
  step gate 15 "$PY" -m benches.gpu_gate "$OUT" --fused "$FUSED"
}

echo "gpu.sh: OUTDIR=$OUT PART=$PART device=$DEVICE dry-run=$DRY"
case "$PART" in
  headline) headline ;;
  extra) extra ;;
  *) echo "unknown PART $PART (headline or extra)"; exit 2 ;;
esac
echo "gpu.sh: time boxes of this part: ${BOXES}s (budget ${BUDGET_S}s)"
if [ "$BOXES" -gt "$BUDGET_S" ]; then
  echo "gpu.sh: the time boxes exceed the ${BUDGET_S}s budget"; FAILED+=("time boxes ${BOXES}s > ${BUDGET_S}s")
fi
[ "$DRY" = 1 ] && { [ "$BOXES" -le "$BUDGET_S" ]; exit $?; }
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'gpu.sh: FAILED: %s\n' "${FAILED[@]}" | tee -a "$OUT/steps.txt"
  exit 1
fi
echo "gpu.sh: all steps passed; results in $OUT" | tee -a "$OUT/steps.txt"
exit 0
