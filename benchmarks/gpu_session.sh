#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: correctness against the CPU and the reference,
# the benchmark's columns, a launch/sync profile and the test suite, each bounded in
# time, logs in $OUT (default gpu_out/; at most 8 files). Reads the reference package
# from wheels in .whl/ when there (pip download --no-deps singd==0.0.5 einconv -d .whl).
#   bash benchmarks/gpu_session.sh   (7 minutes on an H200 with BUDGET=420: the bfloat16
#   ViT Toeplitz rows and the end of the test suite did not fit)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-450}  # seconds for everything; later sections get what is left

section() {  # name limit command...: run with a time limit, log to $OUT/name.log
    local name=$1 limit=$2 left=$((BUDGET - SECONDS))
    shift 2
    ((limit > left)) && limit=$left
    if ((limit < 20)); then echo "== $name: skipped (no time left)"; return; fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: rc=$? after ${SECONDS}s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    python3 -c "import singd, einconv; print('reference', singd.__file__)"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

B="python3 benchmarks/bench.py --rounds 7 --iters 10 --T 1 10"
S5="dense diagonal blockdiagonal:30 hierarchical:15,15 triltopleftdiag:1"
section check 110 python3 benchmarks/gpu_check.py
section bench_f32 150 $B --dtypes float32 --structures $S5 --json "$OUT/bench_f32.json"
section bench_bf16 90 $B --dtypes bfloat16 --structures $S5 --no-reference
section bench_toeplitz 60 $B --dtypes float32 bfloat16 --structures triltoeplitz triutoeplitz --no-reference
section profile 90 python3 benchmarks/gpu_profile.py
section pytest 150 env OMP_NUM_THREADS=1 python3 -m pytest -q -x -n 16 -p no:cacheprovider tests

for f in check bench_f32 bench_bf16 bench_toeplitz profile; do
    echo "==== $f"
    [ -f "$OUT/$f.log" ] && grep -E '^\||GFLOP|median|worst|failures|Error|error' "$OUT/$f.log" | grep -v '^|---' | tail -n 80
done
echo "==== pytest"
tail -n 5 "$OUT/pytest.log" 2>/dev/null
