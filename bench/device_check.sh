#!/usr/bin/env bash
# The device check of grpo-fast (issue 12): on ONE H100/H200, in at most 8 minutes, the CUDA tests (kernels compiled,
# not interpreted) and the four benchmark suites at their headline cases with their peers, written under OUT_DIR,
# a JSON summary as the last stdout line.
#
#   bash bench/fetch_wheels.sh                    # once, on a machine with a registry: trl, datasets, liger-kernel...
#   bash bench/device_check.sh OUT_DIR            # on the GPU machine (no registry needed), from the repository root
#   bash bench/device_check.sh --dry-run OUT_DIR  # the same steps on CPU, tiny shapes, kernels interpreted (< 1 min;
#                                                 # the four suites in one process there: imports dominate on a CPU)
#
# With the device tool: run(command="bash bench/device_check.sh $OUT", carry=[".whl"], timeout_s=600).
#
# Parts, with the estimate on an H100/H200 and the cap (a part is stopped at its cap, or earlier when the whole
# check would pass 470 s; a stopped suite keeps the rows it finished, see bench/device_summary.py):
#   1. setup         ~15 s  (cap  40)  the carried wheels into a temporary --target (PYTHONPATH), the project
#                                      installed editable without fetching anything, versions printed
#   2. tests         ~80 s  (cap 100)  kernel tests (grpo_loss, fused linear, selective log-softmax, paths agree),
#                                      FlexAttention packing (sliding windows, sinks, soft-capping), the compiled and
#                                      captured decode step; 8 pytest-xdist workers when xdist imports (each Triton
#                                      specialization compiles once per worker, so the compiles run in parallel)
#   3. grpo_loss     ~40 s  (cap  55)  N=8192 V=151936 bf16, full: grpo_fast vs torch, torch.compile, Liger, TRL
#   4. fused_linear  ~40 s  (cap  55)  N=8192 H=1536/4096 V=151936 frozen head, full: vs torch, Liger, TRL's head
#   5. engine        ~90 s  (cap 100)  Qwen2.5-0.5B shape: rollouts Lp=256 new=128 G=8, eager / compiled decode /
#                                      transformers generate, ops per step, rollout-vs-training log-probs in bf16;
#                                      training forward+backward shared vs unshared (the compile is ~60 s of it)
#   6. step         ~100 s  (cap 120)  Qwen2.5-0.5B shape, LoRA, 4 prompts x 8 x 256 new: the trainer's step (its
#                                      warm-up step compiles the LoRA model's decode step, ~60 s) vs TRL's
#   7. summary        ~2 s             summary.json, the suites' JSON in bench/results/'s format
# Sum of the estimates ~370 s; of the caps 470 s (setup's included: it is not stopped, it fetches nothing).
#
# OUT_DIR receives at most 8 files (the device tool brings back 8): summary.json, tests.log, bench.log and one
# <suite>_<device-slug>_<date>.json per suite (bench/results/README.md's format; commit them there).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then echo "usage: bash bench/device_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/grpo_fast_device_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 GRPO_FAST_BENCH_ROWS="$WORK/rows.jsonl"
BUDGET=470
if ((DRY)); then
    BUDGET=110  # the dry run takes 45-50 s on 2 busy CPU cores (the CI test's own timeout is larger)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    SUITE_ARGS=(--quick --device cpu)
    TESTS=(tests/test_decode.py::test_rows_draw_independently
           tests/test_decode.py::test_captured_decode_on_cuda_equals_eager  # skipped on CPU, collected all the same
           tests/test_selective_log_softmax.py::test_kernel_entropy_and_inplace)
else
    export TRITON_INTERPRET=0  # conftest.py would interpret where /dev/nvidiactl is missing
    SUITE_ARGS=(--device cuda)
    TESTS=(tests/test_grpo_loss.py tests/test_fused_linear.py tests/test_selective_log_softmax.py
           tests/test_paths_agree.py tests/test_decode.py tests/test_packing.py::test_flex_matches_sdpa_on_cuda
           tests/test_model_coverage.py::test_flex_attention_on_cuda
           --deselect tests/test_decode.py::test_compiled_decode_equals_eager  # the CPU inductor test: CI's
           --deselect tests/test_decode.py::test_host_sync_in_step_falls_back_with_one_line)
fi
START=$SECONDS

# part NAME CAP LOG COMMAND...: runs COMMAND (a program, or the shell function `setup`) with its output appended to
# LOG, stopped at min(CAP, what is left of BUDGET); records "name rc seconds cap" in $WORK/parts.tsv.
part() {
    local name=$1 cap=$2 log=$3 left t0 rc
    shift 3
    left=$((BUDGET - (SECONDS - START)))
    ((cap > left)) && cap=$left
    if ((cap < 5)); then
        printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "$cap" >>"$WORK/parts.tsv"
        echo "== $name: not started, the time budget is spent" | tee -a "$log"
        return
    fi
    echo "== $name (cap ${cap} s)" | tee -a "$log"
    t0=$SECONDS
    if [[ $(type -t "$1") == function ]]; then
        "$@" >>"$log" 2>&1  # setup: local pip installs and imports, nothing that can wait on a network
    else
        timeout --kill-after=5 "$cap" "$@" >>"$log" 2>&1
    fi
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$cap" >>"$WORK/parts.tsv"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

setup() {
    local wheels=("$ROOT"/.whl/*.whl)
    if ((DRY)); then  # the carried wheels are built for the GPU image's Python 3.12: the dry run uses this environment
        echo "dry run: .whl/ not installed; the peers this environment lacks will be rows marked missing"
    elif [[ -e "${wheels[0]}" ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            "${wheels[@]}" || return 1
        echo "installed into $WORK/site: ${wheels[*]##*/}"
    else
        echo "no .whl/ (bash bench/fetch_wheels.sh): the peers this machine lacks will be rows marked missing"
    fi
    if ! "$PY" - "$DRY" "$ROOT" <"$WORK/versions.py"; then  # exit 3: grpo_fast is not installed from ROOT
        ((DRY)) && { echo "dry run: grpo_fast is not installed from $ROOT"; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" || return 1
        "$PY" - "$DRY" "$ROOT" <"$WORK/versions.py" || return 1
    fi
}
cat >"$WORK/versions.py" <<'PYEOF'
import importlib.metadata as md
import sys
from pathlib import Path

try:  # the kernels import only through the installed package mapping (pyproject.toml)
    import grpo_fast
    import grpo_fast.kernels  # noqa: F401
except ImportError:
    sys.exit(3)
if Path(grpo_fast.__file__).parent != Path(sys.argv[2]) / "grpo_fast":
    sys.exit(3)
import torch

print("grpo_fast from", grpo_fast.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for pkg in ("triton", "transformers", "peft", "accelerate", "trl", "datasets", "liger-kernel", "pyarrow", "fsspec",
            "huggingface-hub", "pytest-xdist"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "missing")
for module in ("trl", "datasets", "liger_kernel") if sys.argv[1] == "0" else ():  # seconds each: GPU runs only
    try:
        __import__(module)
    except Exception as e:  # reported, not fatal: that peer's rows say why
        print(f"import {module} fails: {type(e).__name__}: {e}")
PYEOF

((DRY)) || [[ ! -d "$ROOT/.whl" ]] || export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
part setup 40 "$OUT/bench.log" setup
WORKERS=()
((DRY)) || { "$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n 8); }
part tests 100 "$OUT/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider "${WORKERS[@]}" \
    --junitxml="$WORK/tests.xml" "${TESTS[@]}"
if ((DRY)); then  # one process for the four suites: on a CPU, importing torch and transformers dominates a part
    part suites 80 "$OUT/bench.log" "$PY" -m bench.run --headline --out-dir "$WORK/results" "${SUITE_ARGS[@]}"
else
    for suite in grpo_loss fused_linear engine step; do
        case $suite in grpo_loss | fused_linear) cap=55 ;; engine) cap=100 ;; step) cap=120 ;; esac
        part "$suite" "$cap" "$OUT/bench.log" "$PY" -m bench.run --headline --suite "$suite" \
            --out-dir "$WORK/results" "${SUITE_ARGS[@]}"
    done
fi
"$PY" -m bench.device_summary "$WORK" "$OUT"  # its last stdout line is the summary; exit 1 if any part failed
