"""Bad input and faults on REAL CPU servers with every tier on: a clear error, the server stays healthy, nothing is
lost, and tiersched's own state stays bounded.

Two servers from the session's pool (test/conftest.py; tiny MoE, `tiersched.rig`), both shared with earlier modules
(test/rig_servers.py): `dp2` (two DP ranks behind the DP controller: request + engine tiers) is the live A/B's
tiersched arm, which has served the live A/B, load, mid-run drain and bench_serving tests before; `dpattn` (`--tp 2
--dp 2 --enable-dp-attention`, expert parallel with EPLB running our placement: request + engine + expert tiers)
has served the engine tier's DP-attention check. Each test sends its inputs to both; the last test of the module
checks what the whole run left, the earlier modules' runs included: `/health`, no traceback in the log, no request
left on any rank
(`/v1/loads`), and the sizes our tiers report (`/server_info` -> `internal_states[i].tiersched`; the engine tier's
`tiersched engine state:` log line in the DP controller; sglang/state_report.py).

What upstream 0.5.23 does with the same inputs is in patches/input-validation.md (an empty prompt and an id
outside the vocabulary kill its scheduler; everything else here it answers as below).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import rig_servers

LS, BE = 10, 0
SERVERS = {"dp2": rig_servers.DP2_TIERSCHED, "dpattn": rig_servers.DPATTN_ALL_TIERS}
EXPECTED_TIERS = {"dp2": {"request", "engine"}, "dpattn": {"request", "engine", "expert"}}
BURST = 500
pytestmark = [pytest.mark.server, pytest.mark.timeout(900), pytest.mark.rig_servers(*SERVERS.values())]


@pytest.fixture(scope="module")
def servers(rig_pool):
    return dict(zip(SERVERS, rig_pool.get_many(list(SERVERS.values()))))


@pytest.fixture(scope="module")
def model_limits(tiny_model_dir):
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg["vocab_size"], cfg["max_position_embeddings"]


def post(url, path, body, timeout=120):
    """(HTTP status, parsed JSON or text) of a POST."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def get(url, path, timeout=30):
    with urllib.request.urlopen(url + path, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def healthy(url) -> bool:
    try:
        return get(url, "/health")[0] == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def gen(ids=None, text=None, max_new_tokens=4, priority=BE, **extra):
    body = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
            "priority": priority, **extra}
    body.update({"input_ids": ids} if ids is not None else {"text": text})
    return body


def error_message(payload) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload))
        return json.dumps(err) if not isinstance(err, str) else err
    return str(payload)


# Upstream warnings logged with exc_info that are not failures: the launcher's POST /freeze_gc to itself right
# after start-up may find the HTTP server not yet listening (http_server.py, "post-warmup freeze_gc failed").
KNOWN_UPSTREAM_WARNINGS = ("post-warmup freeze_gc failed",)


def unexpected_tracebacks(log: str) -> list[str]:
    """Each traceback in the server log (with 3000 characters of context) not announced by a known warning; a
    chained one ("The above exception was the direct cause ...") belongs to the traceback before it."""
    out, head_known = [], False
    for m in re.finditer(r"Traceback \(most recent call last\)", log):
        previous_line = log[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        chained = previous_line.startswith(("The above exception", "During handling of the above exception"))
        if not chained:
            head_known = any(w in previous_line for w in KNOWN_UPSTREAM_WARNINGS)
        if not head_known:
            out.append(log[max(0, m.start() - 1000):m.start() + 2000])
    return out


def log_text(srv) -> str:
    with open(srv.log_path, errors="replace") as f:
        return f.read()


@pytest.mark.parametrize("name", list(SERVERS))
def test_active_tiers_line_matches_the_flags(servers, name):
    active = set()
    for line in log_text(servers[name]).splitlines():
        if "[tiersched] active tiers:" in line:
            active |= {t.strip() for t in line.split("active tiers:", 1)[1].split("(pid", 1)[0].split(",")}
    assert EXPECTED_TIERS[name] | {"input-validation", "cpu-fixes"} == active


@pytest.mark.parametrize("name", list(SERVERS))
def test_bad_inputs_get_a_clear_error_and_the_server_keeps_serving(servers, model_limits, name):
    srv = servers[name]
    vocab, context = model_limits
    cases = {
        # upstream crashes on these two (patches/input-validation.md); ours: 400 naming the problem
        "empty text": (gen(text=""), r"prompt is empty"),
        "empty input_ids": (gen(ids=[]), r"input_ids cannot be empty"),  # upstream rejects this one itself
        "id >= vocabulary": (gen(ids=[5, 6, vocab + 3]), rf"input_ids\[2\] = {vocab + 3} .*vocabulary has {vocab}"),
        "negative id": (gen(ids=[-1, 5]), r"input_ids\[0\] = -1"),
        # upstream's own errors
        "prompt longer than the context": (gen(ids=[7] * (context + 8)), r"longer than the model's context length"),
        "negative max_new_tokens": (gen(ids=[5, 6], max_new_tokens=-1), r"max_new_tokens"),
        "non-integer priority": (gen(ids=[5, 6], priority="urgent"), r"priority"),
        "fractional priority": (gen(ids=[5, 6], priority=1.5), r"priority"),
    }
    answers = {}
    for case, (body, pattern) in cases.items():
        status, payload = post(srv.url, "/generate", body)
        answers[case] = (status, error_message(payload)[:300])
        assert 400 <= status < 500, (case, status, payload)
        assert re.search(pattern, error_message(payload)), (case, payload)
    for case in ("empty text", "empty input_ids", "id >= vocabulary", "negative id"):
        assert answers[case][0] == 400, answers[case]
    # Inputs upstream accepts: a zero-token completion, and a priority far outside the configured classes.
    status, out = post(srv.url, "/generate", gen(ids=[5, 6], max_new_tokens=0))
    assert status == 200 and out["meta_info"]["completion_tokens"] == 0, out
    for priority in (2 ** 62, -(2 ** 62)):
        status, out = post(srv.url, "/generate", gen(ids=[5, 6, 7], priority=priority))
        assert status == 200 and out["meta_info"]["completion_tokens"] == 4, (priority, out)
    assert healthy(srv.url) and srv.alive()
    status, out = post(srv.url, "/generate", gen(ids=[5, 6, 7, 8]))
    assert status == 200 and out["meta_info"]["completion_tokens"] == 4


async def _burst(url, n):
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(i):
            # 34 tokens: a full 32-token prefix-index page that differs per request, so the engine tier indexes it
            body = gen(ids=[3 + (i * 7 + k) % 500 for k in range(32)] + [10 + i % 200, 11 + i % 150],
                       max_new_tokens=4, priority=LS if i % 5 == 0 else BE)
            async with session.post(url + "/generate", json=body) as r:
                return r.status, await r.json()

        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


@pytest.mark.parametrize("name", list(SERVERS))
def test_burst_of_requests_all_answered(servers, name):
    srv = servers[name]
    t0 = time.monotonic()
    results = asyncio.run(_burst(srv.url, BURST))
    elapsed = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    assert not errors, (len(errors), errors[:3])
    assert all(r[1]["meta_info"]["completion_tokens"] == 4 for r in results)
    assert {r[1]["meta_info"]["dp_rank"] for r in results} == {0, 1}
    print(f"{name}: {BURST} requests in one burst answered in {elapsed:.1f} s")


async def _disconnect_mid_stream(url, n):
    """n streaming clients each read their first event, then drop the connection; returns how many got one."""
    import aiohttp

    async def one(i):
        body = {**gen(ids=[40 + i % 50] * 16, max_new_tokens=200), "stream": True}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            async with session.post(url + "/generate", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        return 1  # leaving the block closes the connection mid-stream
        return 0

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def wait_idle(url, timeout=120) -> list:
    """Wait until no DP rank has a running or waiting request (`/v1/loads`); returns the last loads."""
    deadline = time.monotonic() + timeout
    while True:
        loads = get(url, "/v1/loads")[1]["loads"]
        busy = [(ld.get("dp_rank"), ld.get("num_running_reqs"), ld.get("num_waiting_reqs")) for ld in loads
                if ld.get("num_running_reqs") or ld.get("num_waiting_reqs")]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.5)


@pytest.mark.parametrize("name", list(SERVERS))
def test_clients_that_disconnect_mid_stream_leave_nothing_behind(servers, name):
    srv = servers[name]
    started = asyncio.run(_disconnect_mid_stream(srv.url, 100))
    assert started == 100
    assert wait_idle(srv.url) == [], "requests of disconnected clients still held by the schedulers"
    assert healthy(srv.url)


@pytest.mark.parametrize("name", list(SERVERS))
def test_abort_request_ends_running_and_queued_requests(servers, name):
    import threading

    srv = servers[name]
    out = {}

    def long(rid):
        out[rid] = post(srv.url, "/generate", {**gen(ids=[60, 61, 62], max_new_tokens=4000), "rid": rid}, timeout=300)

    threads = [threading.Thread(target=long, args=(f"abort-{name}-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    assert post(srv.url, "/abort_request", {"rid": f"abort-{name}-0"})[0] == 200
    threads[0].join(60)
    assert not threads[0].is_alive()
    assert post(srv.url, "/abort_request", {"abort_all": True})[0] == 200
    for t in threads[1:]:
        t.join(60)
        assert not t.is_alive()
    for rid, (status, payload) in out.items():
        reason = payload["meta_info"]["finish_reason"] if status == 200 else payload
        assert "abort" in json.dumps(reason).lower(), (rid, status, payload)
    assert wait_idle(srv.url) == []
    assert healthy(srv.url)


def test_rank_drained_and_undrained_under_load(servers):
    """dp2: drain rank 1 while a burst runs; requests sent after the drain all go to rank 0; undrain; everything
    finishes and both ranks serve again (upstream's /set_internal_state, sglang/engine/drain.py)."""
    import threading

    srv = servers["dp2"]
    first = {}
    load = threading.Thread(target=lambda: first.update(r=asyncio.run(_burst(srv.url, 100))))
    load.start()
    time.sleep(1.0)
    assert post(srv.url, "/set_internal_state", {"server_args": {"tiersched_drain_dp_rank_1": 1}})[0] == 200
    drained = asyncio.run(_burst(srv.url, 60))
    assert post(srv.url, "/set_internal_state", {"server_args": {"tiersched_drain_dp_rank_1": 0}})[0] == 200
    after = asyncio.run(_burst(srv.url, 60))
    load.join(300)
    for batch in (first["r"], drained, after):
        assert all(not isinstance(r, BaseException) and r[0] == 200 for r in batch), batch[:3]
    assert {r[1]["meta_info"]["dp_rank"] for r in drained} == {0}
    assert {r[1]["meta_info"]["dp_rank"] for r in after} == {0, 1}
    assert wait_idle(srv.url) == []


@pytest.mark.parametrize("name", list(SERVERS))
def test_zz_after_the_run_healthy_nothing_lost_and_state_bounded(servers, name):
    """Runs last in this module (name order within the file's parametrized tests is file order; zz marks it)."""
    srv = servers[name]
    assert srv.alive() and healthy(srv.url)
    assert wait_idle(srv.url) == []
    mark = len(log_text(srv))
    info = get(srv.url, "/server_info")[1]
    states = [s["tiersched"] for s in info["internal_states"]]
    assert len(states) == 2, states
    for s in states:
        req = s["request"]
        assert 0 <= req["overtake_ahead_tracked"] <= req["overtake_burst"]
        assert req["overtake_credit"] <= req["overtake_burst"]
        if "expert" in EXPECTED_TIERS[name]:
            assert s["expert"]["history_windows"] <= s["expert"]["history_max"]
    deadline = time.monotonic() + 30
    while not (m := re.search(r"tiersched engine state: (\{.*\})", log_text(srv)[mark:])):
        assert time.monotonic() < deadline, "the DP controller logged no engine state"
        time.sleep(0.5)
    engine = json.loads(m.group(1))
    assert engine["prefix_index_keys"] > 0, engine  # the bursts' pages were indexed: the sizes are real
    assert all(b <= engine["prefix_blocks_max_per_rank"] for b in engine["prefix_blocks_per_rank"]), engine
    assert engine["sessions"] <= engine["sessions_max"]
    assert all(c <= 64 for c in engine["pending_charges_per_rank"]), engine  # charges expire with each snapshot
    unexpected = unexpected_tracebacks(log_text(srv))
    assert not unexpected, unexpected[0]
    print(f"{name}: tiersched state after the run: {states}; engine {engine}")


def test_malformed_tiersched_config_stops_the_launch_at_once(tmp_path, tiny_model_dir):
    """A TIERSCHED_CONFIG that is not valid TOML stops `sglang.launch_server` before it starts anything: non-zero
    exit, one sentence naming the file, no traceback."""
    bad = tmp_path / "tiersched.toml"
    bad.write_text("[request]\naging_rate = = 2\n")
    env = {**os.environ, "TIERSCHED_CONFIG": str(bad), "SGLANG_USE_CPU_ENGINE": "1"}
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_model_dir,
                             "--device", "cpu", "--port", "1"], env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tiersched: TIERSCHED_CONFIG file '{bad}' is not valid TOML"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert elapsed < 120, elapsed
