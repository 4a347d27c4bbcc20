"""Load-run helpers without a server: tiling keeps the set's shape and rate; RSS of a process group."""
import os
import subprocess
import sys
import time

import pytest

from tiersched.live.load import RssSampler, group_rss_by_process, group_rss_bytes, tiled
from tiersched.live.requests import synthetic_shared_prefix


def test_tiled_set_has_fresh_rids_and_the_asked_rate():
    base = synthetic_shared_prefix(n=20, rate=1.0)
    s = tiled(base, 100, 5.0)
    assert len(s) == 100 and len({r.rid for r in s.requests}) == 100
    assert s.requests[20].input_ids == base.requests[0].input_ids  # prompts repeat tile after tile
    assert (len(s) - 1) / s.duration_s == pytest.approx(5.0)
    short = tiled(synthetic_shared_prefix(n=200, rate=1.0), 30, 2.0)  # only part of the trace's gaps
    assert (len(short) - 1) / short.duration_s == pytest.approx(2.0)


def test_group_rss_counts_children_of_the_group():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 * 2**20); time.sleep(30)"],
                             start_new_session=True)
    try:
        time.sleep(1.5)
        rss = group_rss_bytes(os.getpgid(child.pid))
        assert rss >= 60 * 2**20  # the child's 64 MiB buffer is resident
        by_process = group_rss_by_process(os.getpgid(child.pid))
        assert list(by_process) == ["tokenizer+http"]  # the group leader is the launcher's role in a real server
        assert by_process["tokenizer+http"] >= 60 * 2**20
        sampler = RssSampler(os.getpgid(child.pid), 0.1)
        sampler.start()
        time.sleep(1.5)  # 15 sampling periods: a sample scans /proc, which takes a while on a loaded 2-core machine
        out = sampler.stop()
        assert out["rss_samples"] >= 3 and out["rss_peak_mib"] >= 60
    finally:
        child.kill()
        child.wait()
