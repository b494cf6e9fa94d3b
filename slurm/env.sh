# Sourced by the sbatch scripts (not run): finds the Python of the project's environment.
#
#   source "$MTL_ROOT/slurm/env.sh"; mtl_python cluster.backends.slurm_array     # sets $python, or exits 2
#
# MTL_ROOT is the project folder (the helpers set it; by hand it is the folder sbatch was
# called from).  The Python is $MTL_PYTHON if set; else, when MTL_SETUP is set, `python3` after
# `eval "$MTL_SETUP"` (e.g. 'module load anaconda; conda activate mtl'); else $MTL_ROOT/.venv.
mtl_python() {
    if [ -n "${MTL_SETUP:-}" ]; then
        # Activation scripts (conda, Lmod) read unset variables: not under the caller's set -u.
        set +u
        eval "$MTL_SETUP" || { echo "error: MTL_SETUP failed: $MTL_SETUP" >&2; exit 2; }
        set -u
    fi
    python=${MTL_PYTHON:-}
    if [ -z "$python" ]; then
        if [ -z "${MTL_SETUP:-}" ] && [ -x "$MTL_ROOT/.venv/bin/python" ]; then
            python=$MTL_ROOT/.venv/bin/python
        else
            python=python3
        fi
    fi
    local module
    for module in "$@"; do
        if ! "$python" -c "import $module" 2>/dev/null; then
            echo "error: $python cannot import $module: set MTL_PYTHON to the environment's python, or" \
                 "MTL_SETUP to the line that activates it" >&2
            exit 2
        fi
    done
}
