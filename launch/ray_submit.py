"""Run a study grid as one Ray Tune sweep (a local Ray by default, or any Ray cluster).

    python launch/ray_submit.py --grid pairings --seeds 0,1,2 --storage s3://bucket/study
    python launch/ray_submit.py --grid weighting --preset paper --workers 4 --gpus-per-worker 1 --address auto
    python launch/ray_submit.py --grid my_grid.yaml --dry-run
    python launch/ray_submit.py --grid smoke --preset smoke --storage runs/smoke-sweep   # minutes on a laptop CPU

Every run-configuration flag of ``python -m mtl.train`` applies to all trials of the grid.
Running the same command again skips finished trials and resumes unfinished ones."""
from cluster.submit import main

if __name__ == "__main__":
    raise SystemExit(main(backend="ray"))
