"""The CPU fixes on real servers: without them `--ep-size 2` and DP attention die on the first forward. DP
attention is checked on the plain DP-attention server of test_request_dpattn_server.py (test_dp_attention_serves)."""
import pytest

import rig_servers
from rig_servers import generate

SINGLE, EXPERT_PARALLEL = rig_servers.TP1_F32_SKEWED, rig_servers.TP2_EP2_F32_SKEWED  # shared (rig_servers.py)
# second_pool: with the expert tier's server check and the smoke test's tp1 case, on the other xdist worker
pytestmark = [pytest.mark.server, pytest.mark.second_pool, pytest.mark.timeout(600),
              pytest.mark.rig_servers(SINGLE, EXPERT_PARALLEL)]

PROMPTS = ["Hello world, this is", "The quick brown fox", "Mixture of experts models route"]


def test_expert_parallel_matches_single_rank_in_float32(rig_pool):
    single, expert_parallel = rig_pool.get_many([SINGLE, EXPERT_PARALLEL])
    reference = [generate(single.url, p, max_new_tokens=12)["output_ids"] for p in PROMPTS]
    outputs = [generate(expert_parallel.url, p, max_new_tokens=12)["output_ids"] for p in PROMPTS]
    with open(expert_parallel.log_path, errors="replace") as f:
        log = f.read()  # from start-up: the server is shared
    assert outputs == reference, log[-6000:]
    assert "cpu-fixes" in log
