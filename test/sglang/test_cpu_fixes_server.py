"""The CPU fixes on real servers: without them `--ep-size 2` and DP attention die on the first forward."""
import pytest

from test_server_smoke import generate
from tiersched.rig.server import launch_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

PROMPTS = ["Hello world, this is", "The quick brown fox", "Mixture of experts models route"]


def _greedy(model, extra_args):
    with launch_server(model, extra_args=["--dtype", "float32", *extra_args]) as srv:
        return [generate(srv.url, p, max_new_tokens=12)["output_ids"] for p in PROMPTS], srv.log_tail(300)


def test_expert_parallel_matches_single_rank_in_float32(skewed_tiny_model_dir):
    reference, _ = _greedy(skewed_tiny_model_dir, [])
    expert_parallel, log = _greedy(skewed_tiny_model_dir, ["--tp", "2", "--ep-size", "2"])
    assert expert_parallel == reference, log
    assert "cpu-fixes" in log


def test_dp_attention_serves(tiny_model_dir):
    with launch_server(tiny_model_dir, extra_args=["--tp", "2", "--dp", "2", "--enable-dp-attention"]) as srv:
        outs = [generate(srv.url, p, max_new_tokens=6) for p in PROMPTS]
    assert all(len(o["output_ids"]) == 6 for o in outs)
