#!/usr/bin/env bash
#SBATCH --job-name=mtl-sweep
#SBATCH --array=0-35
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=runs/sweep/slurm-logs/%x-%A_%a.out
#
# A study grid as a SLURM job array: array task i runs trial i of the grid.
#
# Submit from the project root (the log folder above is relative to it):
#
#   sbatch slurm/sweep.sh                                   # the reference study: pairings grid, seed 0,
#                                                           #   36 trials into runs/sweep/
#   sbatch --array=0-107%8 slurm/sweep.sh --seeds 0,1,2 --preset paper --model bert-base-uncased
#   sbatch --array=0-3 --gres=none slurm/sweep.sh --grid smoke --preset smoke   # CPU only
#
# Everything after the script is passed on: --grid (pairings, weighting, smoke or a YAML file),
# --seeds, --storage (a shared folder or fsspec URL) and any `python -m mtl.train` flag, the same
# for every trial.  Or set MTL_GRID, MTL_SEEDS, MTL_STORAGE (arguments win).  Any other
# --storage than runs/sweep: also pass --output=<storage>/slurm-logs/%x-%A_%a.out and create
# that folder, since SLURM fails a job whose log folder is missing.
#
# Array size = number of trials (x seeds): print it with
#   .venv/bin/python launch/slurm_submit.py --grid pairings --seeds 0,1,2 --count      # -> 108
# then --array=0-107 (add %P to run at most P at once).  An index past the grid fails at once
# with one line naming the grid's size.  launch/slurm_submit.py does all of this for you: it sizes
# the array to the trials still missing, sets the log folder and resources, and --wait follows
# the tasks and writes the results table.
#
# Environment: the job runs $MTL_PYTHON if set; else, if MTL_SETUP is set, it evaluates that line
# and runs `python3`; else the project's .venv/bin/python (slurm/env.sh; the project folder is
# $MTL_ROOT, by default the folder you submit from).  For example:
#   MTL_PYTHON=$HOME/venvs/mtl/bin/python sbatch slurm/sweep.sh
#   MTL_SETUP='module load anaconda; conda activate mtl' sbatch slurm/sweep.sh
#
# Preemption and time limits: 120 s before the limit SLURM sends SIGUSR1; every trial finishes its
# optimizer step, writes a checkpoint, and the task requeues itself and later resumes there.
# SIGTERM (preemption, scancel) checkpoints the same way without requeueing.  A finished trial is
# never run again: its array task exits 0 at once, so resubmitting the same array is safe.
# Trials of 2+ workers (parallel.workers) run DDP over the task's GPUs: give them --gres=gpu:N.
#
# Fused trials (--fuse K; cluster/core/fusion.py): array task i then trains fused group i, up to K
# trials that share batches as one stacked model in one process, so the array is one task a group:
#   .venv/bin/python launch/slurm_submit.py --fuse 10 --count     # -> 9: per pair addition + 9 alphas
#   sbatch --array=0-8 slurm/sweep.sh --fuse 10                   #   fused, the rest alone
# (--fuse auto sizes groups by the GPU's memory: only launch/slurm_submit.py, which pins them.)
set -euo pipefail

source "${MTL_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh" 2>/dev/null ||
    { echo "error: $MTL_ROOT is not this project's folder: submit from the project root, or set MTL_ROOT" >&2; exit 2; }
mtl_python cluster.backends.slurm_array
# exec: Python becomes the batch step's process, so SIGUSR1 from --signal=B:... reaches it.
exec "$python" -m cluster.backends.slurm_array --grid "${MTL_GRID:-pairings}" --seeds "${MTL_SEEDS:-0}" \
    --storage "${MTL_STORAGE:-runs/sweep}" "$@"
