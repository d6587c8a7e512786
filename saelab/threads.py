"""Torch on one thread for work made of many small operations (probe fits, bootstrap resamples): a thread pool's
start-up per operation costs more than the operation, tens of times more on a busy 2-core machine."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch thread, restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
