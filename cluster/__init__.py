"""Adapters from the trial library (mtl) to cluster runtimes: Ray Train/Tune and submitit."""
