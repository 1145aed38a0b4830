"""glibc malloc tuning of the PPO trainer on CPU (stackllama/ppo/speedups/cpu_allocator.py): freed
tensor memory is reused instead of being unmapped and faulted in again; a user's own malloc
environment is left alone. Each case runs in a fresh process (the setting is process-wide)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

WORKLOAD = """
import resource, sys, torch
from stackllama.ppo.speedups.cpu_allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None

def step():  # tensors of 1-30 MB made, touched and freed, as in a training step
    kept = []
    for mb in (1, 2, 3, 6, 12, 24, 30):
        kept.append(torch.empty(mb << 18).fill_(1.0))
    del kept

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(mode, **env):
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, tuned = run("tuned")
    _, default = run("default")
    assert applied == "True"
    # each step touches 78 MB (20k pages). glibc's defaults: 27k-1.7M minor faults over the 100
    # steps (run alone or under pytest); tuned: 0, or the 7,680 pages of one 30 MB block once
    # (seen up to 7,681)
    assert default > 15_000 and tuned <= 10_000, (default, tuned)


def test_a_users_malloc_environment_is_left_alone():
    applied, faults = run("tuned", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False"
    assert faults > 20_000  # a fixed 128 KB threshold: every tensor is mmapped anew
