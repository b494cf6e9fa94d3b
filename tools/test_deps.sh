#!/usr/bin/env bash
# What the integration tests need beyond the Python environment, on a Debian/Ubuntu machine
# (root): headless Chromium (the TensorBoard page check) and the local one-node SLURM cluster.
#
#   bash tools/test_deps.sh          # idempotent: installs what is missing, starts what is stopped
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    echo "test_deps: installing chromium" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/tmp/mtl-chromium-apt.log 2>&1 || {
        apt-get update -q >>/tmp/mtl-chromium-apt.log 2>&1
        apt-get install -y -q --no-install-recommends chromium >>/tmp/mtl-chromium-apt.log 2>&1 ||
            { echo "test_deps: error: apt-get install chromium failed (see /tmp/mtl-chromium-apt.log)" >&2; exit 1; }
    }
fi
bash slurm/local_cluster.sh start
