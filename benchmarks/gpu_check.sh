#!/usr/bin/env bash
# One short check of fedqc on a CUDA machine: the scoring and training-step benchmarks on the GPU,
# then a one-round `fedqc run` of the demo with the server and every client on the GPU, and the
# device and dtype each of them recorded. Prints ratios against the float32 references (in the
# same process) and what ran where; about 5 minutes on one H100-class GPU after install.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # PYTHON=... to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
py=${PYTHON:-.venv/bin/python}
fedqc="$(dirname "$py")/fedqc"
export PYTHONUNBUFFERED=1

"$py" - <<'EOF'
import torch
from fedqc.models.placement import resolve
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA GPU here; nothing to check")
p = resolve("auto", "auto")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(p.device)}: auto = {p.describe()}")
EOF

echo "== scoring throughput (reference: batch size 1, float32), fedqc in float32 (auto) and bf16 =="
"$py" benchmarks/scoring_throughput.py --device cuda --samples 64 --repeats 3 --ref-repeats 2
"$py" benchmarks/scoring_throughput.py --device cuda --dtype bfloat16 --samples 64 --repeats 3

echo "== training step: model.dtype=auto (float32 weights, bf16 autocast) and bfloat16 against float32 =="
"$py" benchmarks/training_step.py --device cuda --dtype auto --steps 20 --repeats 2
"$py" benchmarks/training_step.py --device cuda --dtype bfloat16 --steps 20 --repeats 2

echo "== one-round fedqc run on the GPU (4 clients share it) =="
"$fedqc" run --out "$out/run" --force --set train.rounds=1 --set federation.client-gpus=0.25
"$py" - "$out/run" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
print("server:", json.loads((run / "summary.json").read_text())["placement"])
for sel in sorted(run.glob("clients/client-*/selection.json")):
    print(f"{sel.parent.name}:", json.loads(sel.read_text())["placement"])
EOF
