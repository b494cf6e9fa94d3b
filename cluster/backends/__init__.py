"""Where a study's trials run: Ray Tune, SLURM job arrays and submitit, side by side over
cluster.core.  Each imports ray or submitit only when it is used."""
