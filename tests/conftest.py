"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before anything imports triton, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
