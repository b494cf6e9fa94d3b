"""Submit a study grid as SLURM job arrays of slurm/sweep.sh, sized to the trials still missing.

    python launch/slurm_submit.py --grid pairings --seeds 0,1,2 --storage /shared/study --wait
    python launch/slurm_submit.py --grid pairings --seeds 0,1,2 --count       # array size, for sbatch by hand
    python launch/slurm_submit.py --grid smoke --preset smoke --gpus-per-worker 0 --partition cpu --wait

--wait follows the array tasks (squeue/sacct) and writes the results table; without it the
command submits and returns.  Running it again submits only the trials that are neither
finished nor queued."""
from cluster.submit import main

if __name__ == "__main__":
    raise SystemExit(main(backend="slurm"))
