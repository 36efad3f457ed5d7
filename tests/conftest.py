"""Shared fixtures."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def load_script():
    """Import a file of scripts/ by name: scripts/ is not a package, so tests load it by path."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def one_thread():
    """One thread for torch and numba: on a busy 2-core machine 2 threads can be 10x slower
    (OpenMP threads spin waiting for each other), and training figures depend on the count.

    numba's OpenMP pool, started by its first parallel call, resets the process's OpenMP
    thread count, torch's included, to all cores: start it first, then set both."""
    import numba
    import torch

    from cp3d.core.flows import masks_to_flows

    masks_to_flows(np.pad(np.ones((4, 4), np.int32), 2))
    n, n_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    numba.set_num_threads(n_numba)
