"""Where a study's trials run, side by side over cluster.core: Ray Tune (ray_sweep, with
ray_trial for each trial's Ray Train job), SLURM job arrays (slurm_array) and submitit
(submitit_sweep, with submitit_job for what each job runs), listed by name in registry.
Each imports ray or submitit only when it is used."""
