"""The study and where it runs: the launcher-independent core (study, placement, trial, submit)
and, beside each other, the Ray, SLURM-array and submitit backends.  Only the backends import
ray or submitit, and only when they are used."""
