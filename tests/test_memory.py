"""Each job reports its own peak memory, also the jobs of a sweep that share one process."""

import sys

import pytest
import torch

from ptune.train.loop import peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.cuda.is_available(), reason="Linux CPU peak RSS")
def test_reset_peak_memory_starts_a_new_peak():
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    high = peak_memory_mb()
    del big
    reset_peak_memory()
    assert peak_memory_mb() < high - 200  # the next job does not inherit the 256 MiB
