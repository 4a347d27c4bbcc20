"""Real-server evidence, CI-sized: reduced A/B, load at 2x capacity, DP rank drained mid-run.

Real upstream servers (tiny MoE on this CPU) from the session's pool: the three dp2 arms' servers start at once
(with the next planned ones): the A/B uses all three, after which the pool stops the upstream ones; the load run
and the mid-run drain reuse the tiersched one (each reads only what it caused: its own requests, the log written
during its run). The EPLB fault run has its own ep2 server. The 5-minute load run is behind
TIERSCHED_LIVE_FULL_LOAD=1.
"""
import json
import os
import random
import re
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from scipy.stats import mannwhitneyu

from tiersched.live import ab as live_ab, arms as live_arms
from tiersched.live.load import (EXPERT_FAULT_ENV, eplb_fault_run, eplb_fault_server_args, load_run,
                                 midrun_drain_run, rss_bounded)
from tiersched.live.requests import shared_prefix_set
from tiersched.rig.server import spec

import rig_servers

pytestmark = [pytest.mark.server, pytest.mark.slow]

UPSTREAM = ("upstream-lpm", "upstream-priority")
ARMS = {**{n: live_arms.Arm(n, live_arms.UPSTREAM_ARMS[n]) for n in UPSTREAM},
        live_arms.TIERSCHED: live_arms.tiersched_arm("dp2")}
DP2 = {name: rig_servers.dp2_arm(arm) for name, arm in ARMS.items()}
EPLB_FAULTS, EPLB_REBALANCE_EVERY = "ok,nan,negative", 16
EPLB_FAULT_SERVER = spec("tiny", eplb_fault_server_args(EPLB_REBALANCE_EVERY), env={EXPERT_FAULT_ENV: EPLB_FAULTS},
                         max_total_tokens=live_ab.MAX_TOTAL_TOKENS, name="ep2 tiersched eplb faults")

# "Not worse" on LS TTFT is a one-sided Mann-Whitney U test over every LS request of all repeats pooled (7 LS
# requests per run, 21 per arm; the runs alternate A B C, C B A, A B C) against the upstream arm with the lower median: the test fails
# when ours is worse with p < 0.01. A point comparison of medians is a coin flip here: on this 2-core box (client,
# HTTP server, detokenizer and two ranks share it) runs of the SAME arm split between queue-free (LS ~0.05 s) and
# queue-bound (0.3-1.0 s), and which runs fell where decided the earlier versions of this test
# (docs/live-results.md: it failed CI twice, with ours ahead in other runs of the same code). Three repeats, not
# five: each run lasts the set's 23 s of arrivals, and 21 against 21 samples still fail clearly when ours is worse
# (evenly spread samples, ours shifted by 0.35 of their range: p = 0.0006; 0.00001 with 35 against 35).
WORSE_P_VALUE = 0.01
AB_REPEATS = 3
AB_BLOCK_TOKENS = 48
AB_MAX_INPUT = 3072
# A fixed, light arrival rate. The burst-measured capacity is itself too noisy to scale by: 1.89, 5.70 and 6.16
# req/s in three runs on this machine; at 0.5x of 6.16 (3.08 req/s) every arm's runs split between queue-free
# (LS ~0.05 s) and queue-bound (0.5-1.0 s), and which runs fell where decided the comparison (docs/live-results.md).
# 1 req/s is 0.16-0.5x of those measurements: an LS request meets BE prefill in flight, not a standing queue.
AB_RATE_REQ_S = 1.0


def _need(tiers):
    missing = live_arms.missing_tiers(tiers)
    if missing:
        pytest.skip("tier adapter(s) not in this build: " + "; ".join(missing.values()))


def _dp2_servers(rig_pool, names):
    """name -> the dp2 arm's server, checked to run the arm's tiers."""
    servers = dict(zip(names, rig_pool.get_many([DP2[name] for name in names])))
    for name, srv in servers.items():
        live_ab.check_tiers(srv, ARMS[name])
    return servers


def _tiersched_dp2_server(rig_pool):
    return _dp2_servers(rig_pool, [live_arms.TIERSCHED])[live_arms.TIERSCHED]


@pytest.mark.timeout(900)
@pytest.mark.quiet_cpu  # LS TTFT here is queue-free or queue-bound by a few tenths of a core (see above)
@pytest.mark.rig_servers(*DP2.values())  # fresh servers: the A/B runs first in this module
def test_reduced_ab_tiersched_not_worse_on_cached_tokens_and_ls_ttft(rig_pool):
    """All tiers vs upstream's best flags for each metric, 24 shared-prefix requests, 3 alternating repeats
    at 1 req/s: cached tokens not below the better of upstream-lpm / upstream-priority (within 2%, the arms' spread
    at this light load); LS TTFT not significantly worse than the better."""
    _need(("request", "engine"))
    upstream = UPSTREAM
    arms = list(ARMS.values())
    request_set = shared_prefix_set(24, 1.0, block_tokens=AB_BLOCK_TOKENS, max_input=AB_MAX_INPUT)
    servers = _dp2_servers(rig_pool, list(ARMS))
    runs = live_ab.run_ab(servers, arms, request_set.with_rate(AB_RATE_REQ_S), repeats=AB_REPEATS)
    summaries = {name: runs[name].summaries for name in runs}
    for name, arm_summaries in summaries.items():
        for s in arm_summaries:
            assert s["errors"] == 0 and s["lost"] == 0, (name, s)
            assert s["ls_requests"] > 0, (name, s)
    cached = {name: sum(s["cached_tokens"] for s in v) for name, v in summaries.items()}
    ls_ttft = {name: statistics.median(r.ttft for results in runs[name].results for r in results
                                       if r.success and r.cls == "ls") for name in runs}
    print("cached tokens:", cached, "pooled LS TTFT medians:", ls_ttft, "per-run LS means:",
          {name: [round(s["ls_ttft_mean_s"], 3) for s in v] for name, v in summaries.items()})
    # At 1 req/s every arm serves nearly every shared block from cache: one run measured 27984 / 28368 / 28176
    # (lpm / priority / tiersched), a 1.4% spread that is timing noise, not dispatch; "not worse" is within 2%.
    assert cached["tiersched"] >= 0.98 * max(cached[n] for n in upstream), cached
    best = min(upstream, key=ls_ttft.get)
    ls_samples = {name: [r.ttft for results in runs[name].results for r in results if r.success and r.cls == "ls"]
                  for name in (best, "tiersched")}
    worse = mannwhitneyu(ls_samples["tiersched"], ls_samples[best], alternative="greater")
    print(f"LS TTFT ours vs {best}: one-sided Mann-Whitney p = {worse.pvalue:.4f}")
    assert worse.pvalue >= WORSE_P_VALUE, (best, worse.pvalue, ls_ttft, summaries)


def _load(tiny_model_dir, rig_pool, duration_s):
    _need(("request", "engine"))
    out = load_run(tiny_model_dir, duration_s=duration_s, factor=2.0, server=_tiersched_dp2_server(rig_pool))
    print("load run:", out)
    assert out["server_alive"]
    assert out["errors"] == 0 and out["lost"] == 0, out
    # planned = int(rate x duration) from the unrounded rate (the printed rate is rounded to 3 decimals)
    assert out["completed"] == out["requests"] == out["planned_requests"] > 0, out
    assert out["arrival_span_s"] >= 0.9 * duration_s
    assert out["rss_samples"] >= duration_s / 2
    assert out["rss_peak_mib"] < 8 * 1024, out  # the whole dp2 process group (5 processes)
    return out


@pytest.mark.timeout(600)
@pytest.mark.rig_servers(DP2[live_arms.TIERSCHED])
def test_load_twice_capacity_ci_sized(tiny_model_dir, rig_pool):
    """2x the capacity measured on the same server just before, for 30 s of arrivals (the 5-minute run's rate),
    with the same checks: nothing lost or failed, every planned request completed, RSS sampled throughout and
    below the bound. Whether memory stops growing is the 5-minute run's check."""
    _load(tiny_model_dir, rig_pool, 30)


@pytest.mark.timeout(1200)
@pytest.mark.skipif(os.environ.get("TIERSCHED_LIVE_FULL_LOAD") != "1",
                    reason="the 5-minute load run; set TIERSCHED_LIVE_FULL_LOAD=1")
@pytest.mark.rig_servers(DP2[live_arms.TIERSCHED])
def test_load_twice_capacity_five_minutes(tiny_model_dir, rig_pool):
    """2x capacity for 300 s: 0 errors, 0 lost, and RSS bounded. Only the schedulers grow, and equally with
    upstream's flags alone (docs/live-results.md), so the check is that the growth stops, not that it is zero."""
    out = _load(tiny_model_dir, rig_pool, 300)
    # memory bounded: the group's RSS stops growing (3rd -> 4th quarter), see live.load.rss_bounded
    assert rss_bounded(out), {k: v for k, v in out.items() if k.startswith("rss_")}


@pytest.mark.timeout(400)
@pytest.mark.rig_servers(DP2[live_arms.TIERSCHED])
def test_rank_drained_mid_run_gets_no_more_requests_and_none_are_lost(tiny_model_dir, rig_pool):
    """Fault test: drain DP rank 1 over HTTP in the middle of a stream; take it back after the stream."""
    _need(("request", "engine"))
    n, tail = 30, 6
    out = midrun_drain_run(tiny_model_dir, drained_rank=1, n=n, rate=3.0, drain_after=12, after_undrain=tail,
                           server=_tiersched_dp2_server(rig_pool))
    print("mid-run drain:", out)
    assert out["server_alive"]
    assert out["errors"] == 0 and out["lost"] == 0 and out["completed"] == n + tail, out
    assert out["drain_reply"] and all(x is True for x in out["drain_reply"]), out
    assert out["undrain_reply"] and all(x is True for x in out["undrain_reply"]), out
    assert 1 in out["ranks_before_drain"], out  # rank 1 was serving before the fault
    assert out["drained_with_running_request"], out  # and was running a request when the drain landed
    assert out["finished_on_drained_rank_after_drain"] >= 1, out  # its in-flight requests finished there
    assert out["ranks_while_drained"] and set(out["ranks_while_drained"]) == {0}, out
    assert out["drain_logged"] and out["undrain_logged"], out
    assert 1 in out["ranks_after_undrain"], out  # taken back: it receives requests again


@pytest.mark.timeout(400)
@pytest.mark.rig_servers(DP2[live_arms.TIERSCHED])
def test_priced_ls_cap_decides_on_each_dp2_rank(rig_pool):
    """dp2 has no DP attention: each rank prices its own LS cap for a group of one (the simulator's one-rank prior,
    rescaled to its prefill steps). Long BE prompts with short LS requests among them on both ranks: each
    scheduler says it prices alone and which model it took up, and logs the priced decisions where the fixed rule
    would have capped (kept or dropped), and every request is answered."""
    _need(("request",))
    srv = _tiersched_dp2_server(rig_pool)
    start = os.path.getsize(srv.log_path)
    rng = random.Random(7)
    jobs = []
    with ThreadPoolExecutor(max_workers=24) as pool:
        for i in range(24):
            ls = i % 3 == 2
            ids = [rng.randrange(3, 500) for _ in range(96 if ls else 2600)]  # unique: no shared prefix
            jobs.append(pool.submit(_generate_ids, srv.url, ids, 10 if ls else 0))
            time.sleep(0.05)
        results = [j.result() for j in jobs]
    assert all(r["meta_info"]["finish_reason"]["type"] == "length" for r in results)
    assert {r["meta_info"].get("dp_rank") for r in results} >= {0, 1}, results  # both ranks served
    with open(srv.log_path, errors="replace") as f:
        whole = f.read()
    assert whole.count("tiersched cap pricing: a rank of its own") == 2, srv.log_tail(80)  # one per DP rank
    assert re.search(r"tiersched cap pricing: model=\{.*\} \(prior\)", whole), srv.log_tail(80)
    decided = [tuple(map(int, m.groups())) for m in re.finditer(
        r"tiersched cap pricing: kept (\d+) dropped (\d+) LS caps this pass \(group 1,", whole[start:])]
    print("priced decisions (kept, dropped) per pass:", decided)
    assert decided and sum(k + d for k, d in decided) > 0, srv.log_tail(80)


def _generate_ids(url, input_ids, priority):
    body = {"input_ids": input_ids, "priority": priority,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.timeout(400)
@pytest.mark.second_pool  # its server is its own: it runs on the other xdist worker (test/conftest.py)
@pytest.mark.rig_servers(EPLB_FAULT_SERVER)
def test_bad_eplb_statistics_mid_run_keep_the_placement(tiny_model_dir, rig_pool):
    _need(("request", "expert"))
    out = eplb_fault_run(tiny_model_dir, faults=EPLB_FAULTS, rebalance_every=EPLB_REBALANCE_EVERY, n=30,
                         server=rig_pool.get(EPLB_FAULT_SERVER))
    print("eplb fault run:", out)
    assert out["status"] == "ok" and out["server_alive"]
    assert out["errors"] == 0 and out["lost"] == 0 and out["completed"] == 30, out
    assert out["faults_injected"] >= 1, out  # at least one bad window reached the planner mid-run
    assert out["kept_placement"] >= out["faults_injected"], out
