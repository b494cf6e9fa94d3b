"""Run a study grid through submitit: SLURM (``--cluster slurm``), local subprocesses or in-process.

    python launch/submitit_sweep.py --grid pairings --storage /shared/study --partition gpu --time 8:00:00
    python launch/submitit_sweep.py --grid smoke --preset smoke --cluster local

Each trial is a checkpointable job: on preemption or timeout submitit requeues it and it resumes
from its own checkpoint on the shared storage.  Waits with a progress line and writes the
results table."""
from cluster.submit import main

if __name__ == "__main__":
    raise SystemExit(main(backend="submitit"))
