"""The request tier's DP-wide (lockstep) LS signal on a REAL `--tp 2 --dp 2 --enable-dp-attention` CPU server.

A long BE prompt is routed to DP rank 0 (`routed_dp_rank`) and chunk-prefilled at 128 tokens per step; while it
prefills, short LS requests are routed to DP rank 1 one after another. Rank 0 never has LS work of its own, so
every cap of its BE chunk is the group signal at work. With `ls_hold_s = 0` a cap exists only in a step where
some rank reported LS work, and the adapter's log line says where the count came from: `source=same-step` is the
all-reduce before batch formation (docs/request-tier.md, "Lockstep"). Asserted from the server's own log: rank 0
(`DP0`) capped the BE request's chunk to `be_chunk_tokens` with no LS waiting there, from the same-step signal;
every request completes; and every request's greedy token ids (float32) equal those of the same requests on the
same server flags without the tier (upstream `fcfs` with priority scheduling). That plain server is also where
the CPU fix for DP attention is checked: without it the first forward fails (`test_dp_attention_serves`).
"""
from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import urllib.request

import pytest

from tiersched.rig.server import spec

LS, BE = 10, 0
BE_TOKENS, LS_TOKENS, LS_REQUESTS = 3000, 48, 6
CHUNK, BE_CHUNK = 128, 32
FLAGS = ["--tp", "2", "--dp", "2", "--enable-dp-attention", "--dtype", "float32", "--enable-priority-scheduling",
         "--chunked-prefill-size", str(CHUNK), "--disable-radix-cache"]
# The fixed cap rule (`ls_cap_pricing=false`): this checks the signal's path from rank 1's LS work to rank 0's cap.
# Whether a cap pays under the priced rule is the core's decision (test/core/test_request_cap_pricing.py); with it
# on, this workload takes no cap at all (the priced rule finds none worth its cost), so the signal's path is checked here
# with the fixed rule.
TIER_ENV = {"TIERSCHED_TIERS": "request",
            "TIERSCHED_SET": f"request.be_chunk_tokens={BE_CHUNK},request.min_chunk_tokens=16,request.ls_hold_s=0,"
                             "request.ls_cap_pricing=false"}


def generate(url, rid, input_ids, max_new_tokens, priority, dp_rank):
    body = {"rid": rid, "input_ids": input_ids, "priority": priority, "routed_dp_rank": dp_rank,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def prompts():
    rng = random.Random(7)
    be = [rng.randrange(3, 500) for _ in range(BE_TOKENS)]
    ls = [[rng.randrange(3, 500) for _ in range(LS_TOKENS)] for _ in range(LS_REQUESTS)]
    return be, ls


def log_since(srv, offset):
    with open(srv.log_path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def run_workload(srv):
    """BE on rank 0 in a thread; once it is prefilling, LS requests on rank 1 one at a time. rid -> output ids."""
    be_prompt, ls_prompts = prompts()
    out, errors = {}, []

    def be_request():
        try:
            out["be"] = generate(srv.url, "be", be_prompt, 8, BE, 0)
        except Exception as exc:  # reported below
            errors.append(exc)

    log_start = os.path.getsize(srv.log_path)
    thread = threading.Thread(target=be_request, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not re.search(r"DP0.*Prefill batch", log_since(srv, log_start)):
        assert time.monotonic() < deadline and thread.is_alive(), srv.log_tail(80)
        time.sleep(0.05)
    for i, ids in enumerate(ls_prompts):
        out[f"ls{i}"] = generate(srv.url, f"ls{i}", ids, 4, LS, 1)
    thread.join(120)
    assert not errors and "be" in out, (errors, srv.log_tail(80))
    assert out["be"]["meta_info"]["completion_tokens"] == 8
    assert all(out[f"ls{i}"]["meta_info"]["completion_tokens"] == 4 for i in range(LS_REQUESTS))
    assert {out[f"ls{i}"]["meta_info"]["dp_rank"] for i in range(LS_REQUESTS)} == {1}
    assert out["be"]["meta_info"]["dp_rank"] == 0
    return {rid: o["output_ids"] for rid, o in out.items()}


# The request tier with `prefix-aging`, and the same flags with upstream's `fcfs` where no tier acts, only the
# CPU fixes; from the session's pool (test/conftest.py), started at once.
TIERED = spec("tiny", [*FLAGS, "--schedule-policy", "prefix-aging"], env=TIER_ENV, timeout_s=300,
              name="dpattn f32 prefix-aging lockstep")
PLAIN = spec("tiny", [*FLAGS, "--schedule-policy", "fcfs"], timeout_s=300, name="dpattn f32 fcfs")
# second_pool: both servers are this module's own; it runs on the other xdist worker (test/conftest.py)
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.second_pool, pytest.mark.timeout(360),
              pytest.mark.rig_servers(TIERED, PLAIN)]


@pytest.fixture(scope="module")
def servers(rig_pool):
    """(tiered, plain)."""
    return tuple(rig_pool.get_many([TIERED, PLAIN]))


def test_dp_attention_serves(servers):
    """cpu_fixes.ensure_cpu_fill_value: without it DP attention fails on the first forward (the CPU fixes' other
    real-server checks are in test_cpu_fixes_server.py)."""
    prompts = ["Hello world, this is", "The quick brown fox", "Mixture of experts models route"]
    outs = [generate_text(servers[1].url, p, 6) for p in prompts]
    assert all(len(o["output_ids"]) == 6 for o in outs), outs


def generate_text(url, text, max_new_tokens):
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_same_step_signal_caps_other_ranks_be_chunk(servers):
    srv, plain_server = servers
    tiered = run_workload(srv)
    log = log_since(srv, 0)
    assert "same-step LS all-reduce over the attention-DP CPU group (2 DP ranks)" in log, log[-3000:]
    caps = re.findall(r"(DP\d)[^\n]*tiersched lockstep cap: BE chunk (\S+) capped to (\d+) of (\d+) tokens "
                      r"\(group LS signal=(\d+), source=(\S+), no LS waiting on this rank\)", log)
    assert caps, f"no lockstep cap on the BE rank\n{log[-4000:]}"
    # every cap: rank 0's BE chunk, to be_chunk_tokens, from the same-step count (which subsumes the gathered one)
    assert all(c[0] == "DP0" and c[1] == "be" and int(c[2]) == BE_CHUNK and int(c[4]) >= 1 and c[5] == "same-step"
               for c in caps), caps
    plain = run_workload(plain_server)
    plain_log = log_since(plain_server, 0)
    assert "tiersched lockstep" not in plain_log
    assert tiered == plain
