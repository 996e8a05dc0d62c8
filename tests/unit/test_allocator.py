"""`keep_freed_memory`: a step's freed blocks are reused, not faulted in again from the kernel.

Run in a fresh interpreter (the allocator setting is process-wide). The pattern is a step's:
many blocks of about a MiB, all freed at the end. glibc's dynamic thresholds depend on what the
process did before, so the check first pins glibc's documented defaults (128 KiB for both
thresholds), under which every such block is a fresh mapping, then applies the function.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

CODE = """
import ctypes, resource, torch
from asyncflow.pipeline.runner import keep_freed_memory

def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        xs = [torch.ones(1 << 18) for _ in range(20)]  # 20 blocks of 1 MiB, then all freed
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

mallopt = ctypes.CDLL("libc.so.6").mallopt
assert mallopt(-1, 128 << 10) and mallopt(-3, 128 << 10)  # glibc's defaults, made static
before = faults()
applied = keep_freed_memory()
faults()  # the first pass after it grows the heap once
print(before, faults(), applied)
"""


def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's; elsewhere the function is a no-op")
def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, applied = out.stdout.split()
    assert applied == "True"
    assert int(before) > 10 * 20 * 200  # each 1 MiB block was ~256 fresh pages
    assert int(after) < 100
