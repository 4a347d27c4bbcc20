"""Server specs that several test modules share (one server each in a session; see test/conftest.py). A spec only
one module uses lives in that module."""
from __future__ import annotations

import json
import urllib.request

from tiersched.live import ab as live_ab, arms as live_arms, fidelity
from tiersched.rig.server import ServerSpec, spec

# dp2 with upstream's default scheduling and dispatch, metrics on: the reduced fidelity check's server
# (live/fidelity.py SERVER_ARGS); the smoke test's dp2 checks run on it too.
DP2_METRICS = spec("tiny", fidelity.SERVER_ARGS, max_total_tokens=16384, timeout_s=480, name="dp2 metrics")
# float32 on the skewed-router model: tp1 is the CPU fixes' single-rank reference and the smoke test's tp1;
# tp2 ep2 (no EPLB) is the CPU fixes' expert-parallel check and the expert tier's token reference.
TP1_F32_SKEWED = spec("tiny-skewed", ["--dtype", "float32"], name="tp1 f32 skewed")
TP2_EP2_F32_SKEWED = spec("tiny-skewed", ["--dtype", "float32", "--tp", "2", "--ep-size", "2"],
                          name="tp2 ep2 f32 skewed")

# --tp 2 --dp 2 --enable-dp-attention with the request tier's lockstep step plan, metrics on (server-side
# first-token times): the step plan's identical-plans test and the live lockstep A/B's short check.
STEP_PLAN_DPATTN = spec("tiny", ["--tp", "2", "--dp", "2", "--enable-dp-attention", "--chunked-prefill-size", "512",
                                 "--schedule-policy", "prefix-aging", "--disable-radix-cache", "--enable-metrics"],
                        env={"TIERSCHED_TIERS": "request", "TIERSCHED_SET": "request.step_plan=true"},
                        max_total_tokens=16384, timeout_s=300, name="dp2 dp-attention step plan")


def dp2_arm(arm: live_arms.Arm) -> ServerSpec:
    """A live A/B arm's dp2 server (the flags `tiersched.bench live` gives it)."""
    return spec("tiny", live_arms.server_args("dp2", arm), max_total_tokens=live_ab.MAX_TOTAL_TOKENS,
                name=f"dp2 {arm.name}")


# dp2 with the request and engine tiers, the live A/B's tiersched arm: the A/B, load, mid-run drain and bench_serving
# recipe tests, then the fault suite's dp2 checks, which read what the whole run left in its log.
DP2_TIERSCHED = dp2_arm(live_arms.tiersched_arm("dp2"))

# DP attention with expert parallel, EPLB running our placement and every tier (docs/install.md: DP attention + EP
# on CPU), metrics on, 16-token prefix-index pages: the engine tier's DP-attention score check, then the fault
# suite's dpattn server, which reads what the whole run left in its log.
DPATTN_ALL_TIERS = spec(
    "tiny", ["--tp", "2", "--dp", "2", "--enable-dp-attention", "--ep-size", "2", "--enable-eplb",
             "--eplb-algorithm", "source_aware", "--eplb-rebalance-num-iterations", "50", "--dtype", "float32",
             "--boundary-reduction", "ar", "--schedule-policy", "prefix-aging", "--enable-priority-scheduling",
             "--load-balance-method", "score", "--enable-metrics"],
    env={"TIERSCHED_SET": "engine.block_tokens=16"}, timeout_s=480, name="dpattn all tiers")


def generate(url: str, text: str, max_new_tokens: int = 8, **extra) -> dict:
    """POST /generate (greedy) and return the response."""
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}, **extra}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())
