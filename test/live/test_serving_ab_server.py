"""The bench_serving A/B recipe at small size on real servers: upstream-lpm and tiersched (dp2), real
`python -m sglang.bench_serving` processes (a BE and an LS stream per run), then serving-ab over their files. The two
dp2 servers are the live A/B's (rig_servers.dp2_arm, shared through the session's pool; every run flushes the
cache first)."""
import json

import pytest

from tiersched.bench import serving_ab
from tiersched.bench.__main__ import main as bench_main
from tiersched.live import ab as live_ab, arms as live_arms, serving

import rig_servers

ARMS = [live_arms.Arm("upstream-lpm", live_arms.UPSTREAM_ARMS["upstream-lpm"]), live_arms.tiersched_arm("dp2")]
SERVERS = [rig_servers.dp2_arm(arm) for arm in ARMS]
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.rig_servers(*SERVERS)]


@pytest.mark.timeout(900)
def test_recipe_runs_bench_serving_against_both_arms_and_serving_ab_reads_it(rig_pool, tmp_path, capsys):
    missing = live_arms.missing_tiers(("request", "engine"))
    if missing:
        pytest.skip("tier adapter(s) not in this build: " + "; ".join(missing.values()))
    arms = ARMS
    streams = serving.default_streams(rate=4.0, ls_fraction=0.25, requests=16, groups=2)
    assert [(s.cls, s.groups, s.requests) for s in streams] == [("be", 2, 12), ("ls", 2, 4)]
    servers = dict(zip([a.name for a in arms], rig_pool.get_many(SERVERS)))
    for arm in arms:
        live_ab.check_tiers(servers[arm.name], arm)
    files = serving.run_recipe(servers, [a.name for a in arms], streams, tmp_path, repeats=2, timeout_s=300)
    assert sorted(p.name for p in files) == ["tiersched-be.jsonl", "tiersched-ls.jsonl",
                                             "upstream-lpm-be.jsonl", "upstream-lpm-ls.jsonl"]
    for path in files:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == 2  # one line per repeat, appended by bench_serving itself
        for line in lines:
            assert line["backend"] == "sglang" and line["dataset_name"] == "generated-shared-prefix"
            assert len(line["ttfts"]) == line["completed"] and not any(line["errors"]), line["errors"]

    result = serving_ab.serving_ab(files)
    assert result["arms"] == ["tiersched", "upstream-lpm"] and result["runs"] == 8
    for cls, n in (("be", 12), ("ls", 4), ("all", 16)):
        for arm in ("tiersched", "upstream-lpm"):
            s = result["classes"][cls]["arms"][arm]
            assert s["repeats"] == 2 and s["completed"] == 2 * n and s["errors"] == 0, (cls, arm, s)
            assert s["mean_ttft_ms"] > 0
    # the BE stream sends 6 requests per shared system prompt: both arms hit the prefix cache (the LS stream's 2
    # per prompt may arrive before the first one's prefill is cached, so no count is asserted for it)
    for cls in ("be", "all"):
        assert all(result["classes"][cls]["arms"][arm]["cached_tokens"] > 0 for arm in ("tiersched", "upstream-lpm"))
    ratios = result["classes"]["all"]["ratios"]
    assert ratios["run:mean_ttft_ms"]["upstream-lpm"]["repeats"] == [2, 2]
    assert ratios["request:ttft_mean"]["upstream-lpm"]["n_ours"] == 32
    assert result["ttft_ratio"] > 0 and result["cached_tokens_ratio"] > 0

    assert bench_main(["serving-ab", "--json", *map(str, files)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ttft_ratio"] == result["ttft_ratio"]
    print(serving_ab.format_table(result, "tiersched"))
