"""Shared fixtures."""

import numpy as np
import pytest


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
