#!/usr/bin/env bash
# The main job: prepare data, train with periodic evaluation, export a SavedModel and
# evaluate the export.
#
#   scripts/train.sh [CONFIG] [MODEL_DIR] [PARAMS_OVERRIDE]
#
# CONFIG           experiment YAML (default: configs/rfcn_synthetic.yaml, the embedded
#                  default: a generated shapes dataset; training took 5.0 min on 2
#                  CPU cores, see the README)
# MODEL_DIR        checkpoints, logs, results (default: runs/<config name>); re-running
#                  with the same MODEL_DIR continues the run instead of starting over
# PARAMS_OVERRIDE  "a.b=1,c.d=x" overrides on top of CONFIG (default: none)
#
# Relative paths are taken from the repository root (the script runs from there).
# PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${1:-configs/rfcn_synthetic.yaml}"
MODEL_DIR="${2:-runs/$(basename "${CONFIG%.*}")}"
OVERRIDE="${3:-}"
PYTHON="${PYTHON:-python}"

echo "== 1/4 data: ${CONFIG}"
# Synthetic splits are generated here (seeded, reused when already present); other
# formats are read in place.
"$PYTHON" - "$CONFIG" "$OVERRIDE" <<'PY'
import sys
import rfcn_tf  # noqa: F401
from rfcn_tf.configs import load_config
from rfcn_tf.data import sources
config = load_config(sys.argv[1], sys.argv[2])
for key in ("train_data", "eval_data"):
    data = getattr(config, key)
    if data.format == "synthetic":
        print(f"{key}: synthetic set ready in {sources.synthetic_root(data)}")
    else:
        print(f"{key}: {data.format} data at {data.path}")
PY

echo "== 2/4 train and evaluate: ${MODEL_DIR}"
"$PYTHON" -m rfcn_tf.train --config_file="$CONFIG" --model_dir="$MODEL_DIR" \
    --params_override="$OVERRIDE" --mode=train_and_eval

echo "== 3/4 export SavedModel: ${MODEL_DIR}/export"
# The best checkpoint (eval.best_metric) when there is one, else the latest.
"$PYTHON" -m rfcn_tf.export --model_dir="$MODEL_DIR" --export_dir="$MODEL_DIR/export" \
    --params_override="$OVERRIDE"

echo "== 4/4 evaluate the exported SavedModel"
EXPORTED="$(ls -d "$MODEL_DIR"/export/*/ | sort -V | tail -n 1)"
EXPORTED="${EXPORTED%/}"
"$PYTHON" -m rfcn_tf.evaluate --saved_model="$EXPORTED" --params_override="$OVERRIDE" \
    --output_dir="$MODEL_DIR/export"

echo
echo "Done. ${MODEL_DIR}: config.yaml, ckpt-* (latest), best/ (best by eval.best_metric),"
echo "  eval_results.json, logs/ (tensorboard --logdir ${MODEL_DIR}/logs), train_log.jsonl;"
echo "  SavedModel ${EXPORTED} with its eval_results.json in ${MODEL_DIR}/export."
