#!/usr/bin/env bash
# One-command GPU check: the train-step benchmark (eager vs compiled, every stage at the ImageNet
# shapes, bf16), the numeric parity check (bf16 on the GPU vs fp32 on the CPU: DiT forward,
# DMD gradient, one alignment step) and the decoder's upsampling (resize + conv against the
# transposed form, flagship decoder at batch 32), all written into ONE JSON file.
#
#   scripts/gpu_check.sh                      # on a GPU machine: full sizes, < 10 minutes
#   scripts/gpu_check.sh --small              # CPU, tiny sizes: the plumbing end to end
#   scripts/gpu_check.sh --out results.json   # default: gpu_check.json in the current folder
#
# Python: $PYTHON if set, else the repository's .venv/bin/python, else python3 -- the first that
# imports torch (torch is never installed by this script: a GPU build must already be there).
# When that Python cannot import dmvae_lightning from src/ with its dependencies, the script
# makes .venv-gpu-check (with --system-site-packages, so the existing torch is used) and runs
# `pip install -e .` there, which needs a package index.
#
# Time budget (full run): the benchmark stops after BENCH_TIMEOUT s (default 420), the parity
# check after PARITY_TIMEOUT s (default 150) and the decoder benchmark after DECODER_TIMEOUT s
# (default 90, not yet run on a GPU); stages finished before a timeout are kept. On an
# H200 (torch 2.11, 16 CPU cores), run in parts: the DiT stages compile in 57 and 97 s, the eager
# alignment stage ran in 66 s with its imports, the parity checks in 47 s: 6-7 minutes in all, plus
# the decoder benchmark (at most DECODER_TIMEOUT s). Extra
# benchmark options go in BENCH_ARGS (e.g. BENCH_ARGS="--stages dit-b,align --channels_last"),
# extra parity options in PARITY_ARGS (e.g. PARITY_ARGS="--compile" to check the compiled path).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMALL=0
OUT="$PWD/gpu_check.json"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --small) SMALL=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (use --small, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
  [[ -n "$candidate" ]] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
    PY="$candidate"
    break
  fi
done
if [[ -z "$PY" ]]; then
  echo "gpu_check.sh: no Python that imports torch (set PYTHON=/path/to/python)" >&2
  exit 1
fi
if ! "$PY" -c "import dmvae_lightning.modules.dmvae, timm" 2>/dev/null; then
  echo "gpu_check.sh: $PY lacks the package's dependencies; installing into .venv-gpu-check" >&2
  "$PY" -m venv --system-site-packages "$ROOT/.venv-gpu-check"
  PY="$ROOT/.venv-gpu-check/bin/python"
  "$PY" -m pip install --quiet -e "$ROOT"
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)
if [[ $SMALL == 1 ]]; then
  # CPU: tiny sizes; "compiled" traces through dynamo + AOTAutograd without a C++ build (aot_eager)
  # so that the run takes seconds; bf16 autocast on the CPU stands in for the GPU.
  BENCH=(--small --device cpu --compile_backend aot_eager --warmup 1 --steps 1 --rounds 2)
  PARITY=(--small --device cpu)
  DECODER=(--flagship_batch 0 --steps 1 --rounds 1)
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-600}
  PARITY_TIMEOUT=${PARITY_TIMEOUT:-300}
  DECODER_TIMEOUT=${DECODER_TIMEOUT:-300}
else
  # align eager only: its compilation (ViT-L encoder, decoder, two DiT-XL score models, with and
  # without gradients) did not finish in 235 s on an H200 (torch 2.11), which the budget below
  # cannot hold; BENCH_ARGS="--stages align --eager_only=" BENCH_TIMEOUT=900 measures it alone.
  BENCH=(--device cuda --precision bf16 --warmup 2 --steps 3 --rounds 3 --eager_only align)
  PARITY=(--device cuda)
  DECODER=(--device cuda --precision bf16 --flagship_batch 32 --flagship_steps 5 --steps 10)
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
  PARITY_TIMEOUT=${PARITY_TIMEOUT:-150}
  DECODER_TIMEOUT=${DECODER_TIMEOUT:-90}
fi
# shellcheck disable=SC2206
BENCH+=(${BENCH_ARGS:-})
# shellcheck disable=SC2206
PARITY+=(${PARITY_ARGS:-})

cd "$ROOT"
echo "== benchmark (${BENCH[*]}), at most ${BENCH_TIMEOUT} s" >&2
set +e
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/bench_train_step.py "${BENCH[@]}" --json "$TMP/bench.json"
BENCH_RC=$?
echo "== parity (${PARITY[*]}), at most ${PARITY_TIMEOUT} s" >&2
timeout "$PARITY_TIMEOUT" "$PY" benchmarks/gpu_parity.py "${PARITY[@]}" --json "$TMP/parity.json"
PARITY_RC=$?
echo "== decoder upsampling (${DECODER[*]}), at most ${DECODER_TIMEOUT} s" >&2
timeout "$DECODER_TIMEOUT" "$PY" benchmarks/bench_decoder.py "${DECODER[@]}" --json "$TMP/decoder.json"
DECODER_RC=$?
set -e

"$PY" - "$TMP" "$OUT" "$BENCH_RC" "$PARITY_RC" "$START" "$SMALL" "$DECODER_RC" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

tmp, out, bench_rc, parity_rc, start, small, decoder_rc = sys.argv[1:]
def load(name):
    path = Path(tmp) / name
    return json.loads(path.read_text()) if path.is_file() else None
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
parity = load("parity.json")
result = {
    "small": small == "1",
    "commit": commit or None,
    "seconds": time.time() - int(start),
    "bench": load("bench.json"),
    "bench_exit_code": int(bench_rc),
    "parity": parity,
    "parity_exit_code": int(parity_rc),
    "decoder": load("decoder.json"),
    "decoder_exit_code": int(decoder_rc),
    "passed": bool(parity and parity.get("passed")) and int(bench_rc) == 0 and int(decoder_rc) == 0,
}
Path(out).write_text(json.dumps(result, indent=2))
print(f"gpu_check: {'passed' if result['passed'] else 'FAILED'}; wrote {out} "
      f"({result['seconds']:.0f} s)")
sys.exit(0 if result["passed"] else 1)
EOF
