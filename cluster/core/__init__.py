"""The launcher-independent core of a study: its grid and trials, their placement, the one
entry through which every backend runs a trial, the GPU memory check, and how a launch ends."""
