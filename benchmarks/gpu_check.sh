#!/usr/bin/env bash
# One short check on a CUDA machine (under 8 minutes): the side-by-side Hessian benchmark on the GPU and one
# full-preset experiment run with --device, with a "GPU check" section written to docs/benchmarks.md.
#
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python (a CUDA build of torch) and cuda:0
#   PYTHON=python DEVICE=cuda:1 EXPERIMENT=explr_scale_invariance bash benchmarks/gpu_check.sh
#
# The experiment (default explr_equivalence: 2 x 20,000 SGD steps of three float64 BatchNorm MLPs of width 256 on
# all 60,000 Fashion-MNIST images, every tensor on the GPU) must be one whose config has a device field
# (`optiscope run NAME --device cuda` runs a CPU-only one on the CPU, which this check refuses to report as a GPU run).
# Time limits: the benchmark gets BENCH_TIMEOUT seconds (default 170), the experiment EXP_TIMEOUT (default 220), the
# NCCL check DIST_TIMEOUT (default 45), and no step may start past TOTAL_BUDGET (default 450 s, leaving the
# section and the interpreter start-ups inside 8 minutes): each timeout is cut to what is left of the budget. A step
# that runs out of time is recorded as such in the section, never reported as done.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
EXPERIMENT=${EXPERIMENT:-explr_equivalence}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-170}
EXP_TIMEOUT=${EXP_TIMEOUT:-220}
DIST_TIMEOUT=${DIST_TIMEOUT:-45}
TOTAL_BUDGET=${TOTAL_BUDGET:-450}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch.cuda.is_available() is False with $PYTHON; install a CUDA build of torch" \
       "(e.g. make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126')" >&2
  exit 2
fi
if ! "$PYTHON" -c "import sys; from optiscope.experiments.base import get, device_support
sys.exit(0 if device_support(get('$EXPERIMENT'))[0] else 1)"; then
  echo "gpu_check: experiment $EXPERIMENT has no device field (it runs on the CPU only); choose another" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
T0=$(date +%s)

# the timeout of the next step: its own limit, cut to what is left of TOTAL_BUDGET (at least 1 s)
limit() {
  local left=$(( TOTAL_BUDGET - ($(date +%s) - T0) ))
  (( left < 1 )) && left=1
  (( $1 < left )) && echo "$1" || echo "$left"
}

# 1. side by side on the GPU (writes its own docs/benchmarks.md section "side_by_side_gpu")
timeout "$(limit "$BENCH_TIMEOUT")" "$PYTHON" benchmarks/bench_side_by_side.py --device "$DEVICE" --quick \
  --sections hvp,eig,slq,memory --slq-steps 40 --json "$OUT/side_by_side.json" > "$OUT/side_by_side.log" 2>&1
BENCH_RC=$?
T1=$(date +%s)

# 2. one full-preset experiment on the GPU (its config.yaml records the device)
timeout "$(limit "$EXP_TIMEOUT")" "$PYTHON" -m optiscope.cli.main run "$EXPERIMENT" --preset full \
  --device "$DEVICE" --out "$OUT/$EXPERIMENT-full" --force --quiet > "$OUT/experiment.log" 2>&1
EXP_RC=$?
T2=$(date +%s)

# 2b. the distributed Hessian on NCCL, one rank per GPU (float64 agreement with one process, HVP time)
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
timeout "$(limit "$DIST_TIMEOUT")" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
  benchmarks/bench_distributed.py --backend-check nccl > "$OUT/distributed_nccl.log" 2>&1
export DIST_RC=$? NGPU

# 3. the GPU section
BENCH_RC=$BENCH_RC EXP_RC=$EXP_RC T_BENCH=$((T1 - T0)) T_EXP=$((T2 - T1)) EXPERIMENT=$EXPERIMENT OUT=$OUT \
DEVICE=$DEVICE "$PYTHON" - <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from _report import write_section

import torch

out = Path(os.environ["OUT"])
dev = torch.device(os.environ["DEVICE"])
name = torch.cuda.get_device_name(dev)
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as e:  # noqa: BLE001
    smi = f"nvidia-smi unavailable ({type(e).__name__})"


def status(rc: int) -> str:
    return "done" if rc == 0 else ("ran out of time" if rc in (124, 137) else f"failed (exit {rc})")


bench_rc, exp_rc = int(os.environ["BENCH_RC"]), int(os.environ["EXP_RC"])
lines = ["## GPU check (`benchmarks/gpu_check.sh`)", "",
         f"{name} ({smi}); torch {torch.__version__}, CUDA {torch.version.cuda}.", "",
         "| step | status | wall seconds |", "|---|---|---|",
         f"| side-by-side benchmark (`--device {dev} --quick`, section `side_by_side_gpu`) | {status(bench_rc)} | "
         f"{os.environ['T_BENCH']} |",
         f"| `optiscope run {os.environ['EXPERIMENT']} --preset full --device {dev}` | {status(exp_rc)} | "
         f"{os.environ['T_EXP']} |",
         f"| DistributedHessian on NCCL, {os.environ['NGPU']} rank(s) (`bench_distributed.py --backend-check nccl`) "
         f"| {status(int(os.environ['DIST_RC']))} | - |", ""]
dist_log = out / "distributed_nccl.log"
if dist_log.exists():
    lines += ["NCCL check (per rank): " + "; ".join(
        ln.strip() for ln in dist_log.read_text().splitlines() if ln.startswith('{"backend"')), ""]
run_dir = out / f"{os.environ['EXPERIMENT']}-full"
if (run_dir / "config.yaml").exists():
    from optiscope.lab.store import RunStore, StoreError

    try:
        recorded = RunStore.open(run_dir).read_config().get("device")
        lines += [f"The run's config.yaml records device = {recorded!r}.", ""]
    except StoreError as e:
        lines += [f"config.yaml unreadable: {e}", ""]
res = run_dir / "results.json"
if res.exists():
    r = json.loads(res.read_text())
    lines += ["Claims of the full-preset run:", "", "| claim | measured | holds |", "|---|---|---|"]
    for c in r.get("claims", []):
        lines.append(f"| {c.get('id', '')}: {str(c.get('claim', ''))[:90]} | {str(c.get('measured', ''))[:60]} | "
                     f"{c.get('holds')} |")
else:
    tail = (out / "experiment.log").read_text()[-600:] if (out / "experiment.log").exists() else ""
    lines += ["No results.json was written. Last lines of the log:", "", "```", tail.strip(), "```"]
write_section("gpu_check", "\n".join(lines))
print("\n".join(lines))
EOF
echo "gpu_check: benchmark $BENCH_RC, experiment $EXP_RC, total $(( $(date +%s) - T0 )) s; see docs/benchmarks.md"
