"""Engine tier on real upstream servers on this CPU (`--load-balance-method score`), three servers in all from the
session's pool (test/conftest.py):

- `--dp-size 2` and DP attention `--tp 2 --dp 2 --enable-dp-attention` (with every tier: the fault suite's server,
  test/rig_servers.py DPATTN_ALL_TIERS): one prompt set with shared prefixes,
  sent twice in the same server session. Baseline pass: request i carries `routed_dp_rank = i % 2`, which is the
  exact assignment upstream's `round_robin_scheduler` makes for requests sent one at a time (counter over the
  active ranks); then /flush_cache (every rank's radix cache, and our prefix index with it); then the score pass.
  SGLang's own per-request `meta_info.cached_tokens` must sum higher under score.
- `--dp-size 2` with `[engine] drain_ranks = "1"`: rank 1 is marked inactive through upstream's
  `update_active_ranks`; every request must report `meta_info.dp_rank == 0`. This is the dp2 score server itself,
  started with rank 1 drained: the drained check runs first and takes the rank back over HTTP (upstream's
  `/set_internal_state`, live.load.set_drain), and the score check takes it back too before it starts, so that
  it also holds when run alone. One dp2 server fewer to start (~60 s of CPU here).
"""
from __future__ import annotations

import json
import random
import urllib.request

import pytest

from tiersched.live.load import set_drain
from tiersched.rig.server import spec

import rig_servers

GROUPS, REPEATS, PREFIX, SUFFIX = 5, 4, 96, 8


def post(url, path, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
    return json.loads(text) if text.strip().startswith(b"{") else text


def prompt_set(seed=0):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(PREFIX)] for _ in range(GROUPS)]
    prompts = [p + [rng.randrange(3, 500) for _ in range(SUFFIX)] for p in prefixes for _ in range(REPEATS)]
    rng.shuffle(prompts)
    return prompts


def run(url, prompts, round_robin):
    outs = []
    for i, ids in enumerate(prompts):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        if round_robin:
            body["routed_dp_rank"] = i % 2
        outs.append(post(url, "/generate", body)["meta_info"])
    return outs


def cached_tokens_score_vs_round_robin(url):
    prompts = prompt_set()
    rr = run(url, prompts, round_robin=True)
    post(url, "/flush_cache")
    score = run(url, prompts, round_robin=False)
    return rr, score


def metrics_text(url):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return r.read().decode()


# The two score deployments and the dp2 one with rank 1 drained at start, by name. The DP-attention one is the
# fault suite's all-tier server (rig_servers.py: also expert parallel with EPLB, prefix-aging with priorities; the
# same `--load-balance-method score`, metrics and 16-token pages), shared through the session's pool.
SCORE_ENV = {"TIERSCHED_SET": "engine.block_tokens=16"}
DRAINED_RANK = 1
SERVERS = {"dp2": spec("tiny", ["--dp-size", "2", "--load-balance-method", "score", "--enable-metrics"],
                       env={"TIERSCHED_SET": f"engine.block_tokens=16,engine.drain_ranks={DRAINED_RANK}"},
                       name="dp2 score, rank 1 drained at start"),
           "dp-attention": rig_servers.DPATTN_ALL_TIERS}
assert dict(SERVERS["dp-attention"].env) == SCORE_ENV, "the score checks run with 16-token prefix-index pages"
SCORE_DEPLOYMENTS = {name: list(SERVERS[name].flags) for name in ("dp2", "dp-attention")}
pytestmark = [pytest.mark.server, pytest.mark.timeout(420)]
# Each test declares only the server it uses: the dp2 one is this module's own, the DP-attention one the fault
# suite's (test/conftest.py stops each after its last declared test).
ON_DP2, ON_DPATTN = (pytest.mark.rig_servers(SERVERS[name]) for name in ("dp2", "dp-attention"))


def server(rig_pool, name):
    return rig_pool.get(SERVERS[name])


@ON_DP2
def test_drained_rank_receives_nothing(rig_pool):
    """Runs before the dp2 score check (file order): the server starts with rank 1 drained."""
    srv = server(rig_pool, "dp2")
    try:
        outs = run(srv.url, prompt_set(seed=1)[:8], round_robin=False)
        log = srv.log_tail(300)
        assert [m["dp_rank"] for m in outs] == [0] * 8, log
        with open(srv.log_path, errors="replace") as f:
            assert "drained (marked inactive)" in f.read()  # a start-up line: at the top of the log
    finally:
        undrain = set_drain(srv.url, DRAINED_RANK, False)  # the score check needs both ranks
    assert undrain and all(x is True for x in undrain), undrain


@pytest.mark.parametrize("name", [pytest.param("dp2", marks=ON_DP2), pytest.param("dp-attention", marks=ON_DPATTN)])
def test_score_gets_more_cached_tokens_than_round_robin(rig_pool, name):
    extra_args = SCORE_DEPLOYMENTS[name]
    srv = server(rig_pool, name)
    if name == "dp2":  # started with rank 1 drained; the drained check above normally took it back already
        set_drain(srv.url, DRAINED_RANK, False)  # a no-op then; both ranks serving is asserted below
    rr, score = cached_tokens_score_vs_round_robin(srv.url)
    metrics = metrics_text(srv.url)
    log = srv.log_tail(300)
    rr_cached = sum(m["cached_tokens"] for m in rr)
    score_cached = sum(m["cached_tokens"] for m in score)
    print(json.dumps({"args": extra_args, "round_robin_cached_tokens": rr_cached,
                      "score_cached_tokens": score_cached, "requests": len(rr)}))
    assert {m["dp_rank"] for m in rr} == {0, 1}, log
    assert {m["dp_rank"] for m in score} == {0, 1}, "score should still use both ranks"
    assert score_cached > rr_cached, (rr_cached, score_cached, log)
    with open(srv.log_path, errors="replace") as f:
        assert "tiersched: DP dispatch by score" in f.read()  # a start-up line: at the top of the log
    assert 'tiersched_dispatch_requests_total{dp_rank="0"}' in metrics, metrics[:2000]
    assert "tiersched_dispatch_expected_prefix_hit_tokens_total" in metrics
    assert "tiersched_dispatch_imbalance" in metrics

