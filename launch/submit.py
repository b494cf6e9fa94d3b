"""Run a study grid on Ray, as SLURM job arrays, or through submitit (``--backend``).

    python launch/submit.py --backend slurm --grid pairings --seeds 0,1,2 --storage /shared/study --wait

See ``--help`` and cluster/submit.py; the launcher-specific commands beside this one fix the backend."""
from cluster.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
