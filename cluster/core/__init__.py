"""The launcher-independent core of a study: the grid and its trials (study), where they run
but never what they compute (placement), the one entry through which every backend runs a trial
(trial), the GPU memory check (memory), the study's flags (flags), its TensorBoard experiment
(tensorboard), how every launch ends (ending: what is left to run, the results table, the
report), and what a backend is (backend).  No ray, no submitit; torch only where a trial runs."""
