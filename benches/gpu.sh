#!/usr/bin/env bash
# The one script for a lent GPU machine (PLATFORM.md, "The GPU machine": Python 3.12, torch 2.11 + triton 3.6
# preinstalled, no network).  Installs the carried wheels and the package, runs the CUDA tests and every GPU
# benchmark, and writes JSON (+ logs, + PNG where matplotlib exists) into OUTDIR.
#
#   benches/gpu.sh OUTDIR [all|1|2]     part 1: install, CUDA tests, matmul rate + the CLIP sweep (<= 9.5 min)
#                                       part 2: install (skipped if done), SigLIP, InfoNCE variants, NT-Xent,
#                                               dispersive, uniformity, PatchNCE, CONFORM, the report (<= 9 min)
#   benches/gpu.sh --dry-run OUTDIR [PART]   print the steps without running them (works on any machine)
#   benches/gpu.sh --fetch-wheels            on the CPU machine (network): download/build the peers' wheels
#                                            for Python 3.12 into benches/wheels/ (carried by the run tool)
#
# Every step is time-boxed (`timeout`), and each bench run also gets a --time-limit a little shorter than its
# box, so it stops starting new cases, prints its table and writes its JSON itself; the JSON is also rewritten
# after every case.  A failing step never stops the script.  Afterwards copy OUTDIR/*.json (and *.png) into
# benches/results/ and run `python -m benches.report` for the README table.
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --fetch-wheels)
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    W="$ROOT/benches/wheels"; mkdir -p "$W"
    PIP=${PIP:-"$ROOT/.venv/bin/pip"}
    # pure-python or cp312 manylinux wheels; --no-deps: torch/triton/timm/numpy are already on the GPU machine.
    # No torchvision: timm there already needs one matching its torch build, and a PyPI wheel built for another
    # CUDA would make `import torchvision` (and so timm and open_clip) raise.
    "$PIP" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$W" \
      inf-cl==1.2.1 pytorch-metric-learning==2.9.0 open-clip-torch==3.3.0 ftfy regex wcwidth tqdm || exit 1
    "$PIP" wheel --no-deps -w "$W" pykeops==2.3 keopscore==2.3 || exit 1   # sdists -> py3-none-any wheels
    ls -la "$W"; exit 0 ;;
esac
OUT=${1:?usage: benches/gpu.sh [--dry-run] OUTDIR [all|1|2]}
PART=${2:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}

# Compiled Triton, not the interpreter.  Set to 0 rather than unset: tests/conftest.py does
# os.environ.setdefault("TRITON_INTERPRET", "1"), which an unset variable would let through.
export TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1

step() {  # step NAME LIMIT_S CMD... : run with a time box, log to OUTDIR/NAME.log, never abort the script
  local name=$1 limit=$2; shift 2
  echo "== [$name] (limit ${limit}s) $*"
  [ "$DRY" = 1 ] && return 0
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== [$name] rc=$rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
}

ensure_cli() {  # the console script may land outside PATH (user site): fall back to a wrapper
  if [ "$DRY" = 0 ] && ! command -v contrastgen >/dev/null 2>&1; then
    mkdir -p "$ROOT/build/bin"
    printf '#!/bin/sh\nexec %s -m contrastgen.cli "$@"\n' "$PY" > "$ROOT/build/bin/contrastgen"
    chmod +x "$ROOT/build/bin/contrastgen"
    export PATH="$ROOT/build/bin:$PATH"
  fi
}

install() {
  # Part 2 on the same warm machine gets a fresh OUTDIR: the marker lives in the (ignored, kept) build/ folder,
  # and the import must resolve to this checkout.
  if [ "$DRY" = 0 ] && [ -f "$ROOT/build/.gpu-installed" ] && "$PY" -c "import contrastgen, sys; \
      sys.exit(0 if contrastgen.__file__.startswith('$ROOT') else 1)" 2>/dev/null; then
    echo "== [install] already done on this machine"; ensure_cli; return 0
  fi
  if ls benches/wheels/*.whl >/dev/null 2>&1; then
    step install_wheels 120 "$PY" -m pip install --no-index --no-deps benches/wheels/*.whl
  else
    echo "== [install_wheels] no benches/wheels/*.whl: peers that are not preinstalled will be skipped"
  fi
  step install_package 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
  ensure_cli
  if [ "$DRY" = 0 ]; then
    "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton, contrastgen
from contrastgen.ops import backend_available, implementations
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for b in ("triton", "cpp"):
    print(b, backend_available(b))
for op in ("infonce_core", "siglip_core", "dispersive_loss", "uniformity"):
    print(op, sorted(implementations(op)))
EOF
    mkdir -p "$ROOT/build" && touch "$ROOT/build/.gpu-installed"
  fi
}

bench() {  # bench NAME LIMIT_S ARGS... : one contrastgen bench run into OUTDIR, stopping itself before the box
  local name=$1 limit=$2; shift 2
  step "bench_$name" "$limit" contrastgen bench --device cuda --out-dir "$OUT" --tag "$name" \
    --time-limit $(( limit - 45 )) --no-progress "$@"
}

part1() {
  install
  step tests 180 "$PY" -m pytest tests -q -k "not interpret" -p no:cacheprovider
  # CLIP: N 4096..65536 x D {256, 512, 1024} (+ N=262144 at D=256 for the O(N)-memory kernels), bf16.
  bench clip 170 --op clip_loss --dtype bfloat16 --mode fwd,fwd+bwd --budget 0.2
}

part2() {
  install
  bench siglip 130 --op siglip_loss --dtype bfloat16 --mode fwd,fwd+bwd --budget 0.2 \
    --providers reference,triton,open_clip
  bench infonce 130 --op info_nce,nt_xent --dtype bfloat16 --mode fwd,fwd+bwd --budget 0.2
  # SiT-XL/2 dispersive: B in {32..256}, M = 294,912, bf16; plus the many-samples regime and uniformity
  bench dispersive 150 --op dispersive_loss,uniformity --dtype bfloat16 --mode fwd,bwd,fwd+bwd --budget 0.2
  bench patch 90 --op patch_nce,attention_nce --dtype float32 --mode fwd+bwd --budget 0.2
  step report 60 "$PY" -m benches.report --dir "$OUT" --mode all
  [ "$DRY" = 0 ] && cp "$OUT/report.log" "$OUT/report.md" 2>/dev/null
  return 0
}

echo "gpu.sh: OUTDIR=$OUT PART=$PART dry-run=$DRY"
case "$PART" in
  1) part1 ;;
  2) part2 ;;
  all) part1; part2 ;;
  *) echo "unknown PART $PART (all, 1 or 2)"; exit 2 ;;
esac
echo "gpu.sh: done; results in $OUT"
exit 0
