"""GPU tests: marked ``gpu`` and skipped where torch sees no CUDA device.

``MTL_GPU_TESTS_ON=cpu`` runs them on the CPU instead (the CUDA-only assertions are left
out): a dry run that checks the tests themselves on a machine without a GPU.  It proves
nothing about CUDA."""
import os

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace, and it reads this when it starts, so
# before any test touches CUDA (the resume test asks for deterministic kernels).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
DRY_RUN = os.environ.get("MTL_GPU_TESTS_ON") == "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA (MTL_GPU_TESTS_ON=cpu dry-runs these tests on the CPU)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available() and not DRY_RUN:
                item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cpu" if DRY_RUN else "cuda"
