"""Request tier on a REAL upstream CPU server (tiny MoE): `--schedule-policy prefix-aging
--enable-priority-scheduling --max-running-requests 2` with a small KV pool (`--max-total-tokens`), one server
for the module.

1. An LS request submitted behind many BE requests finishes first (slot-full preemption).
2. A BE request whose prompt shares nothing with any other request is preempted on a KV shortage (upstream
   never preempts there) and resumes from its own checkpointed prefix: SGLang's per-request
   `meta_info.num_retractions` says it was preempted, and SGLang's own prefill log line for its re-admission
   reports `#cached-token` > 0. (SGLang's per-request `meta_info.cached_tokens` is only updated before a
   request's first retraction -- `ScheduleBatch.prepare_for_extend` skips it once `retracted_stain` is set --
   so it cannot show a resumed request's hit; the batch log line can.)
"""
from __future__ import annotations

import json
import random
import re
import threading
import time
import urllib.request

import pytest

from tiersched.rig.server import spec

LS, BE = 10, 0
MAX_TOTAL_TOKENS = 1400
SERVER = spec("tiny", ["--schedule-policy", "prefix-aging", "--enable-priority-scheduling", "--max-running-requests",
                       "2", "--chunked-prefill-size", "512", "--decode-log-interval", "5"],
              max_total_tokens=MAX_TOTAL_TOKENS, timeout_s=480, name="tp1 prefix-aging 2 slots")
# second_pool: its server is its own; it runs on the other xdist worker (test/conftest.py)
pytestmark = [pytest.mark.server, pytest.mark.second_pool, pytest.mark.timeout(900), pytest.mark.rig_servers(SERVER)]


def generate(url, input_ids, max_new_tokens, priority, timeout=300):
    body = {"input_ids": input_ids, "priority": priority,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def unique_prompt(first_token: int, length: int, seed: int) -> list[int]:
    """Token ids whose first token no other prompt in this module uses: no radix prefix is shared."""
    rng = random.Random(seed)
    return [first_token] + [rng.randrange(3, 512) for _ in range(length - 1)]


class Submitted:
    """Runs generate() in a thread; records the client-side completion time and the response."""

    def __init__(self, url, input_ids, max_new_tokens, priority):
        self.result = self.error = None
        self.done_at = None
        self.thread = threading.Thread(target=self._run, args=(url, input_ids, max_new_tokens, priority), daemon=True)
        self.thread.start()

    def _run(self, *args):
        try:
            self.result = generate(*args)
        except Exception as exc:  # reported by the test
            self.error = exc
        self.done_at = time.monotonic()

    def wait(self, timeout=400):
        self.thread.join(timeout)
        assert self.error is None and self.result is not None, f"request failed: {self.error!r}"
        return self.result


def wait_for_log(srv, pattern, start_len, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(srv.log_path, errors="replace") as f:
            text = f.read()[start_len:]
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"log never matched {pattern!r}; tail:\n{srv.log_tail(80)}")


def log_len(srv) -> int:
    with open(srv.log_path, errors="replace") as f:
        return len(f.read())


@pytest.fixture(scope="module")
def server(rig_pool):
    return rig_pool.get(SERVER)


def test_ls_request_behind_many_be_finishes_first(server):
    start = log_len(server)
    be = [Submitted(server.url, unique_prompt(10 + i, 48, i), 96, BE) for i in range(6)]
    wait_for_log(server, r"Decode batch.*#running-req: 2", start)  # two BE requests hold both slots
    ls = Submitted(server.url, unique_prompt(100, 48, 100), 8, LS)
    ls_out = ls.wait()
    be_out = [b.wait() for b in be]
    assert ls_out["meta_info"]["completion_tokens"] == 8
    assert all(o["meta_info"]["completion_tokens"] == 96 for o in be_out)
    assert all(ls.done_at < b.done_at for b in be), (
        f"LS finished at {ls.done_at:.2f}, BE at {sorted(round(b.done_at, 2) for b in be)}")
    log = open(server.log_path, errors="replace").read()[start:]
    assert re.search(r"tiersched preempted 1 request\(s\) \[[^\]]+\] for \S+ \(reason=slots", log), log[-3000:]


def test_kv_preempted_victim_resumes_from_its_cached_prefix(server):
    start = log_len(server)
    victim_prompt = unique_prompt(200, 700, 200)
    victim = Submitted(server.url, victim_prompt, 400, BE)
    wait_for_log(server, r"Decode batch.*#running-req: 1", start)
    # LS needs 300 + 8 tokens; the victim holds 700+ and reserves its remaining 400 output tokens (ignore_eos):
    # 1400 total cannot fit both, while a second running slot is free -> a KV-shortage preemption.
    ls = Submitted(server.url, unique_prompt(201, 300, 201), 8, LS)
    ls_out = ls.wait()
    victim_out = victim.wait()
    assert ls.done_at < victim.done_at
    assert ls_out["meta_info"]["completion_tokens"] == 8
    assert victim_out["meta_info"]["completion_tokens"] == 400
    assert victim_out["meta_info"].get("num_retractions", 0) >= 1, victim_out["meta_info"]
    log = open(server.log_path, errors="replace").read()[start:]
    m = re.search(r"tiersched preempted 1 request\(s\) \[[^\]]+\] for \S+ \(reason=kv, kv_short=(\d+), "
                  r"victim computed tokens=(\d+)\)", log)
    assert m, log[-3000:]
    computed = int(m.group(2))
    after = log[m.end():]
    # Prefill lines after the preemption: the LS request (nothing cached: unique prompt), then the victim's
    # re-admission, alone, with its own checkpointed prefix as cached tokens.
    hits = [(int(a), int(b), int(c)) for a, b, c in
            re.findall(r"Prefill batch.*?#new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)", after)]
    resumed = [h for h in hits if h[0] == 1 and h[2] > 0]
    assert resumed, f"no re-admission with cached tokens after the preemption: {hits}\n{after[-3000:]}"
    new_tokens, cached = resumed[0][1], resumed[0][2]
    assert cached >= len(victim_prompt) // 2, (cached, computed)
    assert cached + new_tokens >= len(victim_prompt)


def test_repeatedly_preempted_request_is_preempted_at_most_the_bound_and_keeps_its_age(server):
    """LS requests arrive one after another, each while the same BE request runs alone, each short of KV only
    because of it (as above): the BE request is preempted `max_preemptions_per_request` times (its default),
    then no more, so the next LS request waits for it; it finishes, and its wait before its last admission is
    within Theorem 1's bound (docs/request-tier.md) with the preemptions counted as LS overtakes."""
    from tiersched.core.request import RequestTierConfig

    cfg = RequestTierConfig()
    bound = cfg.max_preemptions_per_request
    start = log_len(server)
    submitted = time.monotonic()
    victim = Submitted(server.url, unique_prompt(300, 700, 300), 400, BE)
    wait_for_log(server, r"Decode batch.*#running-req: 1", start)
    ls_done, ls_service = [], []
    for i in range(bound + 1):
        sent = time.monotonic()
        ls = Submitted(server.url, unique_prompt(301 + i, 300, 301 + i), 8, LS)
        ls.wait()
        ls_done.append(ls.done_at)
        ls_service.append(ls.done_at - sent)
        if i < bound:  # the victim runs again, alone, before the next LS request comes
            wait_for_log(server, r"Decode batch.*#running-req: 1", log_len(server))
            last_admission_by = time.monotonic()
    victim_out = victim.wait()
    assert victim_out["meta_info"]["completion_tokens"] == 400
    assert victim_out["meta_info"]["num_retractions"] == bound, victim_out["meta_info"]
    log = open(server.log_path, errors="replace").read()[start:]
    preempted = re.findall(r"tiersched preempted 1 request\(s\) \[([^\]]+)\] for \S+ \(reason=kv", log)
    assert len(preempted) == bound and len(set(preempted)) == 1, preempted
    assert victim.done_at < ls_done[-1]  # the last LS request could not preempt it: it waited for it
    assert all(d < victim.done_at for d in ls_done[:-1])
    # Theorem 1: wait <= aging_cap_s + one step + older backlog (none) + overtakes x LS service; the LS requests
    # that preempted it are its overtakes (their whole service counted as the step bound too).
    waited = last_admission_by - submitted
    assert waited <= cfg.aging_cap_s + (bound + 1) * max(ls_service), (waited, ls_service)
