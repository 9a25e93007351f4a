#!/usr/bin/env bash
# The GPU check, for a machine with CUDA; never run by CI or `make test`. It runs the invariant tests on
# CUDA (TMT_PYG_TEST_DEVICE=cuda), then the speed, decode and exit-speed benchmarks with --device cuda,
# each under a timeout (about 9.5 minutes at most in all), and writes every log and result into one folder.
#
#   benchmarks/gpu_check.sh [OUT]          # OUT: default gpu_check_results/
#   PY=python3 benchmarks/gpu_check.sh     # an interpreter other than .venv/bin/python
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/gpu_check_results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PY:-.venv/bin/python}

"$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch.cuda.is_available() is False (torch {torch.__version__}): no CUDA device, nothing was run")
try:
    import torch_cluster
    cluster = f"torch-cluster {torch_cluster.__version__}, CUDA kernels: {torch_cluster.cuda_version != -1}"
except ImportError:
    cluster = "no torch-cluster"
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, {cluster}")
' 2>&1 | tee "$OUT/summary.txt" || exit 1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

status=0
step() {  # step SECONDS NAME COMMAND...: run COMMAND under a timeout, its output in $OUT/NAME.log
    local limit=$1 name=$2
    shift 2
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "gpu_check: $name: exit $rc$( ((rc == 124)) && echo " (stopped after ${limit}s)")" | tee -a "$OUT/summary.txt"
    ((rc == 0)) || status=1
}

TMT_PYG_TEST_DEVICE=cuda step 220 pytest "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
    tests/test_properties.py::test_mesh_is_the_exact_top_k_of_its_own_sequence \
    tests/test_properties.py::test_conv_equals_dense_masked_attention \
    tests/test_properties.py::test_a_sequence_alone_or_in_a_batch_gives_the_same_rows \
    tests/test_properties.py::test_later_tokens_never_change_earlier_outputs \
    tests/test_fast_path.py::test_causal_and_batch_invariant_on_every_backend \
    tests/test_fused_slots.py::test_model_with_the_fused_op_equals_eager \
    tests/test_generation.py::test_incremental_equals_full \
    tests/test_generation.py::test_prompts_of_different_lengths_decode_together
step 140 speed "$PY" -m benchmarks.speed --device cuda --repeats 3 --no-profile --out "$OUT"
step 120 decode "$PY" -m benchmarks.decode --device cuda --out "$OUT"
step 90 exit_speed "$PY" -m benchmarks.exit_speed --device cuda --repeats 5 --out "$OUT"
exit $status
