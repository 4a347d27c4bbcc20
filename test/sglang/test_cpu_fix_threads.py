"""cpu_fixes.bind_threads_without_amx around upstream's own `_init_cpu_threads_env`: on a CPU without AMX/arm64
the rank gets as many torch threads as its bound cores and its thread is pinned to them; where upstream binds
itself (AMX/arm64) the hook does nothing. Run in a subprocess: it changes the process's threads and affinity."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang.srt.distributed.bootstrap")

from tiersched.sglang.cpu_fixes import parse_cpu_list  # noqa: E402

CHILD = r"""
import json, os, sys
import torch
from sglang.srt.distributed import bootstrap
from tiersched.sglang import cpu_fixes
bootstrap._is_cpu_amx_available = sys.argv[2] == "amx"
bootstrap._is_cpu_arm64 = False
calls = []
def original(*, local_omp_cpuid, dist_init_method=None):
    calls.append(local_omp_cpuid)
upstream = bootstrap._init_cpu_threads_env if sys.argv[2] == "upstream" else original
torch.set_num_threads(len(os.sched_getaffinity(0)))
cpu_fixes.bind_threads_without_amx(upstream, local_omp_cpuid=sys.argv[1], dist_init_method=None)
print(json.dumps({"threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)), "calls": calls}))
"""


def run_child(cpuid: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, cpuid, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cpu_list("1") == [1]
    assert parse_cpu_list("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError):
        parse_cpu_list("0-x")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_binds_the_rank_where_upstream_does_not():
    core = sorted(os.sched_getaffinity(0))[-1]
    got = run_child(str(core), "upstream")  # the real upstream function: logs a warning, binds nothing
    assert got["threads"] == 1 and got["affinity"] == [core], got


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_leaves_amx_cpus_to_upstream():
    core = sorted(os.sched_getaffinity(0))[-1]
    got = run_child(str(core), "amx")
    assert got["calls"] == [str(core)]  # the original still runs
    assert got["threads"] == len(os.sched_getaffinity(0)) and len(got["affinity"]) > 1, got
