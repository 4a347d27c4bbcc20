"""serving-ab: reading sglang.bench_serving --output-file JSONL and the A/B statistics (no server)."""
import json

import numpy as np
import pytest

from tiersched.bench import serving_ab
from tiersched.bench.__main__ import main as bench_main
from tiersched.live import stats


def bench_line(tag, ttft_ms, tpot_ms=10.0, cached=100, completed=4, details=None, **extra):
    """A line as bench_serving writes it (the fields serving-ab reads; the real ones carry many more)."""
    line = {"tag": tag, "backend": "sglang", "dataset_name": "generated-shared-prefix", "completed": completed,
            "mean_ttft_ms": ttft_ms, "p95_ttft_ms": ttft_ms * 2, "mean_tpot_ms": tpot_ms,
            "mean_e2e_latency_ms": ttft_ms + 10 * tpot_ms, "output_throughput": 1000.0 / tpot_ms,
            "cache_report": {"total_prompt_tokens": 1000, "total_cached_tokens": cached}}
    if details is not None:  # per-request TTFTs in seconds
        n = len(details)
        line.update({"ttfts": details, "itls": [[tpot_ms / 1000] * 3] * n, "output_lens": [4] * n,
                     "input_lens": [50] * n, "errors": [""] * n, "cached_tokens": [cached // n] * n})
    line.update(extra)
    return json.dumps(line)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tail_quantile_is_the_projects_tail_rule():
    assert stats.tail_quantile(1000) == 99.0 and stats.tail_quantile(999) == 95.0
    assert stats.tail_quantile(20) == 95.0 and stats.tail_quantile(0) is None


def test_request_ratio_orientation_interval_and_p_value():
    rng = np.random.default_rng(1)
    fast = [list(rng.uniform(0.1, 0.2, 50)) for _ in range(3)]
    slow = [list(rng.uniform(0.3, 0.4, 50)) for _ in range(3)]
    r = stats.request_ratio(fast, slow)  # ours fast: better, ratio ~2.3
    assert 2.0 < r["ratio"] < 2.6 and r["ci95"][0] > 1.5 and r["p_value"] < 0.01 and r["mannwhitney_p"] < 1e-10
    assert r["n_ours"] == r["n_base"] == 150 and r["stat"] == "mean"
    worse = stats.request_ratio(slow, fast, q=95.0)
    assert worse["ratio"] < 1 and worse["p_value"] > 0.99 and worse["stat"] == "p95"
    higher = stats.request_ratio(slow, fast, lower_is_better=False)  # throughput-like: bigger is ours better
    assert higher["ratio"] > 1


def test_run_ratio_pairs_repeats_and_reports_them():
    r = stats.run_ratio([1.0, 2.0, 1.0], [2.0, 2.0, 3.0], lower_is_better=True)
    assert r["paired"] and r["per_repeat"] == [2.0, 1.0, 3.0]
    assert r["ratio"] == pytest.approx(7 / 4) and r["ci95"][0] >= 1.0 and r["ci95"][1] <= 3.0
    unpaired = stats.run_ratio([1.0, 2.0], [2.0, 2.0, 3.0], lower_is_better=True)
    assert not unpaired["paired"] and "per_repeat" not in unpaired


def test_groups_by_tag_and_class_and_merges_classes(tmp_path):
    a = write(tmp_path / "a.jsonl", [bench_line("upstream-lpm:be", 300), bench_line("upstream-lpm:ls", 200, completed=2),
                                     bench_line("upstream-lpm:be", 320), bench_line("upstream-lpm:ls", 220, completed=2)])
    b = write(tmp_path / "b.jsonl", [bench_line("tiersched:be", 250, cached=150), bench_line("tiersched:ls", 100, completed=2),
                                     bench_line("tiersched:be", 260, cached=150), bench_line("tiersched:ls", 110, completed=2)])
    out = serving_ab.serving_ab([a, b])
    assert out["arms"] == ["tiersched", "upstream-lpm"] and out["runs"] == 8
    assert set(out["classes"]) == {"be", "ls", "all"}
    ls = out["classes"]["ls"]["ratios"]["run:mean_ttft_ms"]["upstream-lpm"]
    assert ls["ratio"] == pytest.approx(420 / 210, rel=1e-3) and ls["per_repeat"] == [2.0, 2.0]
    merged = out["classes"]["all"]["arms"]["tiersched"]
    assert merged["repeats"] == 2 and merged["completed"] == 12
    # repeat 0 merged: (250*4 + 100*2) / 6 = 200 ms; cached 150 + 100
    assert merged["mean_ttft_ms"] == pytest.approx((200 + (260 * 4 + 110 * 2) / 6) / 2, rel=1e-3)
    assert merged["cached_tokens"] == 250
    assert out["cached_tokens_ratio"] == pytest.approx(250 / 200)
    assert out["ttft_ratio"] > 1


def test_best_baseline_is_the_strongest_per_metric(tmp_path):
    f = write(tmp_path / "r.jsonl", [bench_line("lpm", 400, cached=300), bench_line("prio", 150, cached=50),
                                     bench_line("tiersched", 200, cached=200)] * 3)
    out = serving_ab.serving_ab([f])
    ratios = out["classes"]["all"]["ratios"]
    assert ratios["run:mean_ttft_ms"]["best_baseline"] == "prio" and out["ttft_ratio"] == pytest.approx(0.75)
    assert ratios["run:cached_tokens"]["best_baseline"] == "lpm" and out["cached_tokens_ratio"] == pytest.approx(2 / 3, rel=1e-3)


def test_per_request_ratios_and_tail_by_sample_size(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(3):
        lines.append(bench_line("base", 300, details=list(rng.uniform(0.2, 0.4, 40))))
        lines.append(bench_line("tiersched", 150, details=list(rng.uniform(0.1, 0.2, 40))))
    out = serving_ab.serving_ab([write(tmp_path / "d.jsonl", lines)])
    ratios = out["classes"]["all"]["ratios"]
    mean = ratios["request:ttft_mean"]["base"]
    assert mean["ratio"] == pytest.approx(2.0, rel=0.15) and mean["ci95"][0] > 1.5 and mean["n_ours"] == 120
    assert ratios["request:ttft_tail"]["base"]["stat"] == "p95"  # 120 samples per arm: P95, not P99
    assert "request:tpot_mean" in ratios
    assert out["classes"]["all"]["arms"]["base"]["errors"] == 0
    table = serving_ab.format_table(out, "tiersched")
    assert "request:ttft_p95" in table and "vs best baseline" in table


def test_errors_in_details_are_counted_and_excluded(tmp_path):
    bad = json.loads(bench_line("tiersched", 100, details=[0.1, 0.2, 0.0]))
    bad["errors"] = ["", "", "HTTP 400: bad"]
    f = write(tmp_path / "e.jsonl", [json.dumps(bad), bench_line("base", 100, details=[0.1, 0.2, 0.3])])
    out = serving_ab.serving_ab([f])
    arm = out["classes"]["all"]["arms"]["tiersched"]
    assert arm["errors"] == 1 and arm["requests"] == 3


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("", "empty"),
    ("{not json\n", "not JSON"),
    ('[1, 2]\n', "not a JSON object"),
    ('{"tag": "a"}\n', "not a bench_serving result"),
    (bench_line(None, 100) + "\n", "has no tag"),
    (bench_line("a:b:c", 100) + "\n", "not ARM or ARM:CLASS"),
])
def test_unreadable_files_give_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "r.jsonl"
    if content is not None:
        path.write_text(content)
    assert bench_main(["serving-ab", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_cli_needs_ours_and_a_baseline(tmp_path, capsys):
    only = write(tmp_path / "o.jsonl", [bench_line("tiersched", 100)])
    assert bench_main(["serving-ab", str(only)]) == 2
    assert "at least one baseline" in capsys.readouterr().err
    other = write(tmp_path / "x.jsonl", [bench_line("a", 100), bench_line("b", 90)])
    assert bench_main(["serving-ab", str(other)]) == 2
    assert "pass --ours" in capsys.readouterr().err
    assert bench_main(["serving-ab", "--json", "--ours", "b", str(other)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ours"] == "b" and out["ttft_ratio"] == pytest.approx(100 / 90, rel=1e-3)


def test_run_level_p_value_is_the_exact_sign_flip_test():
    assert stats.sign_flip_p([2.0, 2.0, 2.0]) == pytest.approx(1 / 8)  # all pairs agree: 1 of 8 flips as extreme
    assert stats.sign_flip_p([2.0, 0.5]) == pytest.approx(0.75)
    r = stats.run_ratio([1.0] * 5, [2.0] * 5, lower_is_better=True)
    assert r["p_value"] == pytest.approx(1 / 32) and r["ci95"] == [2.0, 2.0]
    assert stats.run_ratio([1.0, 2.0], [2.0, 2.0, 3.0], lower_is_better=True)["p_value"] is None  # not paired
