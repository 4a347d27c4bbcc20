"""The CPU fixes on real servers: without them `--ep-size 2` and DP attention die on the first forward. DP
attention is checked on the plain DP-attention server of test_request_dpattn_server.py (test_dp_attention_serves)."""
import pytest

from test_server_smoke import generate
from tiersched.rig.server import launch_servers

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

PROMPTS = ["Hello world, this is", "The quick brown fox", "Mixture of experts models route"]


def test_expert_parallel_matches_single_rank_in_float32(skewed_tiny_model_dir):
    configs = [{"extra_args": ["--dtype", "float32", *args]} for args in ([], ["--tp", "2", "--ep-size", "2"])]
    with launch_servers(skewed_tiny_model_dir, configs) as (single, expert_parallel):  # started at once
        reference = [generate(single.url, p, max_new_tokens=12)["output_ids"] for p in PROMPTS]
        outputs = [generate(expert_parallel.url, p, max_new_tokens=12)["output_ids"] for p in PROMPTS]
        log = expert_parallel.log_tail(300)
    assert outputs == reference, log
    assert "cpu-fixes" in log
