"""The study and where it runs: the launcher-independent core (cluster.core: study, placement,
trial, memory, the ending every launch shares, the Backend interface) and, beside each other
over it, the Ray, SLURM-array and submitit backends (cluster.backends, listed by name in
cluster.backends.registry); cluster.submit is the one command over them, cluster.report the
study's report.  Only the backends import ray or submitit, and only when they are used."""
