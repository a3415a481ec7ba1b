"""Test setup: without a real GPU, the numba.cuda kernels run under numba's CUDA
simulator.  NUMBA_ENABLE_CUDASIM must be set before numba is first imported."""
import os

import torch

REAL_GPU = torch.cuda.is_available()
if not REAL_GPU:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    # numba may already be imported (by pytest plugins or other conftests): make
    # numba.cuda see the variable.
    import numba.core.config

    numba.core.config.reload_config()
