"""What each submitit job runs: one trial (or one fused group of trials, --fuse), as a checkpointable callable that submitit pickles by
reference (this module's path) and calls on the node.  Imports submitit and torch: only the
submitit backend's ``submit`` and the jobs themselves import it (see submitit_sweep.py for why
``checkpoint()`` only resubmits)."""
from __future__ import annotations

import logging

import submitit

from mtl.config import RunConfig
from mtl.dist import DistContext

from cluster.core.study import trial_name
from cluster.core.trial import failed_members, run_group, run_trial


class TrialJob(submitit.helpers.Checkpointable):
    """A trial as a submitit job; every task of a multi-worker job runs it as one rank."""

    def __call__(self, config: dict | list[dict]) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if isinstance(config, list):
            return self.group(config)
        cfg = RunConfig.from_dict(config)
        if submitit.JobEnvironment().num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the process group; the GPU is
            # chosen by local rank (mtl.dist), so CUDA_VISIBLE_DEVICES is left as SLURM set it.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        results = run_trial(cfg, DistContext.from_env(cfg.device))
        return {"trial": trial_name(cfg), "steps": results["steps"], "best": results["best"]}

    @staticmethod
    def group(configs: list[dict]) -> dict:
        """A fused group in this one task (one worker).  A member that diverged fails the job, as
        one trial's divergence does, once the others finished (its row reads its own error)."""
        cfgs = [RunConfig.from_dict(c) for c in configs]
        results = run_group(cfgs, DistContext.from_env(cfgs[0].device))
        error = failed_members(cfgs, results)
        if error is not None:
            raise error
        return {"trials": [trial_name(c) for c in cfgs], "steps": [r["steps"] for r in results]}

    def checkpoint(self, config: dict | list[dict]) -> submitit.helpers.DelayedSubmission:
        # Resubmit only: the trial resumes from its own newest checkpoint (see submitit_sweep.py).
        return submitit.helpers.DelayedSubmission(self, config)
