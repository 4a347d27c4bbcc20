"""`bench live` headline fields from per-request results (no server): ratios, intervals, the LS tail statistic."""
import numpy as np
import pytest

from tiersched.bench import live as bench_live
from tiersched.live.driver import RequestResult
from tiersched.live.report import compare_arms, request_level_ratios, summarize


def _run(rng, ls_ttft, be_ttft, n_ls, n_be):
    out = []
    for i, (cls, lo_hi, n) in enumerate((("ls", ls_ttft, n_ls), ("be", be_ttft, n_be))):
        for j in range(n):
            t = float(rng.uniform(*lo_hi))
            out.append(RequestResult(f"{cls}{j}", cls, 10 if cls == "ls" else 0, 100, 5, sent_s=j * 0.1,
                                     success=True, finished=True, ttft=t, latency=t + 0.4, completion_tokens=5,
                                     cached_tokens=50))
    return out


def _results(rng, repeats, n_ls, n_be=30):
    return {"upstream-lpm": [_run(rng, (0.4, 0.6), (0.35, 0.45), n_ls, n_be) for _ in range(repeats)],
            "upstream-priority": [_run(rng, (0.3, 0.5), (0.8, 1.0), n_ls, n_be) for _ in range(repeats)],
            "tiersched": [_run(rng, (0.1, 0.2), (0.2, 0.3), n_ls, n_be) for _ in range(repeats)]}


@pytest.mark.parametrize("n_ls, repeats, stat", [(70, 3, "p95"), (6, 3, "p95"), (250, 4, "p99"), (0, 3, None)])
def test_ls_tail_statistic_follows_the_sample_size(n_ls, repeats, stat):
    req = request_level_ratios(_results(np.random.default_rng(0), repeats, n_ls), "tiersched")
    if stat is None:  # no LS request at all: no tail
        assert "ls_ttft_tail" not in req
    else:
        assert req["ls_ttft_tail"]["vs_best"]["stat"] == stat
        assert req["ls_ttft_tail"]["best_upstream"] == "upstream-priority"  # the faster LS arm is the bar
    # BE requests are faster on upstream-lpm, LS ones on upstream-priority: the mix decides the better mean
    assert req["ttft_mean"]["best_upstream"] == ("upstream-lpm" if n_ls <= 70 else "upstream-priority")


def test_headline_fields_from_a_report():
    rng = np.random.default_rng(1)
    results = _results(rng, 3, 70)
    summaries = {name: [summarize(r) for r in runs] for name, runs in results.items()}
    entry = {"ratios": compare_arms(summaries, "tiersched"), "request_ratios": request_level_ratios(results, "tiersched"),
             "runs": summaries}
    report = {"repeats": 3, "deployments": {"dp2": {"capacity_req_s": 4.0, "loads": [
        {"load": 1.0, "rate_req_s": 4.0, "sets": {"shared-prefix": entry}}]}}}
    bench_live._headlines(report)
    assert report["errors"] == 0 and report["lost"] == 0 and report["load"] == 1.0
    assert report["cached_tokens_ratio"] == pytest.approx(1.0)
    # tiersched's TTFTs are drawn well below both upstream arms': clearly better, tight interval
    assert report["ttft_ratio"] > 1.3 and report["ttft_ratio_ci95"][0] > 1.2 and report["ttft_p_value"] < 0.01
    assert report["ls_ttft_stat"] == "p95" and report["ls_ttft_ratio"] > 2 and report["ls_ttft_vs"] == "upstream-priority"
    assert report["ls_ttft_ratio_ci95"][0] <= report["ls_ttft_ratio"] <= report["ls_ttft_ratio_ci95"][1]
    assert report["ls_samples_per_arm"] == 210


def test_summary_concurrency_is_littles_law():
    rs = [RequestResult("a", "be", 0, 10, 5, sent_s=0.0, success=True, finished=True, ttft=0.5, latency=2.0,
                        completion_tokens=5),
          RequestResult("b", "be", 0, 10, 5, sent_s=1.0, success=True, finished=True, ttft=0.5, latency=1.0,
                        completion_tokens=5)]
    assert summarize(rs)["concurrency_mean"] == pytest.approx(3.0 / 2.0)


def test_report_rebuilt_from_records_counts_lost_and_keeps_loads(tmp_path):
    from tiersched.live.replay import write_record
    from tiersched.live.requests import synthetic_shared_prefix

    s = synthetic_shared_prefix(n=30, block_tokens=8, rate=4.0, seed=1)
    rng = np.random.default_rng(2)
    for load in (0.8, 1.0):
        for arm, lo in (("upstream-lpm", 0.4), ("upstream-priority", 0.5), ("tiersched", 0.1)):
            for rep in range(2):
                res = []
                for i, r in enumerate(s.requests):
                    lost = arm == "tiersched" and rep == 1 and load == 1.0 and i >= 25  # its server died
                    t = float(rng.uniform(lo, lo + 0.1))
                    res.append(RequestResult(r.rid, r.cls, r.priority, len(r.input_ids), r.output_len, sent_s=i * 0.2,
                                             success=not lost, finished=not lost, ttft=0.0 if lost else t,
                                             latency=0.0 if lost else t + 0.3,
                                             completion_tokens=0 if lost else r.output_len, cached_tokens=4,
                                             dp_rank=i % 2))
                write_record(tmp_path / f"dpattn-shared-prefix-x{load:g}-{arm}-r{rep}.jsonl",
                             {"deployment": "dpattn", "arm": arm, "repeat": rep, "dp": 2, "rate_req_s": 5.0 * load,
                              "load": load}, s, res)
    report = bench_live.from_records(str(tmp_path), ["dpattn"])
    bench_live._headlines(report)
    loads = report["deployments"]["dpattn"]["loads"]
    assert [b["load"] for b in loads] == [0.8, 1.0] and report["repeats"] == 2
    assert report["load"] == 0.8 and report["lost"] == 5 and report["errors"] == 0
    assert report["ttft_ratio"] > 2.5 and report["ttft_vs"] == "upstream-lpm"
    last = loads[1]["sets"]["shared-prefix"]["runs"]["tiersched"][1]
    assert last["lost"] == 5 and last["completed"] == 25


def test_records_of_variant_arms_are_read_and_a_load_without_tiersched_is_reported(tmp_path):
    from tiersched.live.replay import write_record
    from tiersched.live.requests import synthetic_shared_prefix

    s = synthetic_shared_prefix(n=12, block_tokens=8, rate=4.0, seed=1)

    def write(load, arm):
        res = [RequestResult(r.rid, r.cls, r.priority, len(r.input_ids), r.output_len, sent_s=i * 0.2, success=True,
                             finished=True, ttft=0.2, latency=0.5, completion_tokens=r.output_len, cached_tokens=4,
                             dp_rank=i % 2) for i, r in enumerate(s.requests)]
        write_record(tmp_path / f"dpattn-shared-prefix-x{load:g}-{arm}-r0.jsonl",
                     {"deployment": "dpattn", "arm": arm, "repeat": 0, "dp": 2, "rate_req_s": 5.0, "load": load}, s, res)

    for arm in ("upstream-lpm", "upstream-lpm-mixed", "tiersched-nohold", "tiersched"):
        write(0.8, arm)
    write(1.0, "upstream-lpm")  # the run stopped before the tiersched arm ran at 1.0x
    report = bench_live.from_records(str(tmp_path), ["dpattn"])
    entry = report["deployments"]["dpattn"]["loads"][0]["sets"]["shared-prefix"]
    assert set(entry["runs"]) == {"upstream-lpm", "upstream-lpm-mixed", "tiersched-nohold", "tiersched"}
    assert "tiersched-nohold" in entry["ablation_ratios"]
    assert [b["load"] for b in report["deployments"]["dpattn"]["loads"]] == [0.8]
    assert report["incomplete"] == ["dpattn shared-prefix at 1.0: no tiersched record"]


def test_live_tables_goal_needs_both_tests_below_alpha_and_only_from_0_8x():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "live_tables", Path(__file__).resolve().parents[2] / "benchmark" / "live_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)

    def ratio(r, p, mw):
        return {"ratio": r, "ci95": [r - 0.1, r + 0.1], "p_value": p, "mannwhitney_p": mw, "stat": "p95"}

    def block(load, ls_mw):
        run = {"errors": 0, "lost": 0, "ttft_mean_s": 1.0, "ls_ttft_mean_s": 0.5, "tpot_mean_s": 0.1,
               "cached_tokens": 100, "concurrency_mean": 3.0, "server_steps": {"prefill_batches": 40}}
        req = {"ttft_mean": {"vs_best": ratio(1.3, 0.001, 1e-5), "best_upstream": "upstream-lpm"},
               "ls_ttft_tail": {"vs_best": ratio(1.5, 0.001, ls_mw), "best_upstream": "upstream-priority"},
               "ls_ttft_mean": {"vs_best": ratio(1.4, 0.001, 0.001)},
               "tpot_mean": {"vs_best": ratio(0.5, 1.0, 1.0), "best_upstream": "upstream-lpm"}}
        cached = {"vs_best": {"ratio": 1.2, "min": 1.1, "max": 1.3}, "best_upstream": "upstream-lpm"}
        return {"load": load, "rate_req_s": 5.0, "sets": {"shared-prefix": {
            "request_ratios": req, "ratios": {"cached_tokens": cached},
            "runs": {"tiersched": [run], "upstream-lpm": [run]}}}}

    report = {"deployments": {"dpattn": {"loads": [block(0.5, 0.5), block(1.0, 0.036), block(1.2, 0.001)]}}}
    rows = tables.rows(report)
    assert rows[0]["goal"] is None
    assert rows[1]["goal"]["ls_ttft_tail"] is False and rows[1]["goal"]["ttft"] is True
    assert all(rows[2]["goal"].values())
    text = tables.markdown(report)
    assert "missed: ls_ttft_tail" in text and "| met |" in text and "n/a (< 0.8x)" in text
    assert "priced LS caps" not in text  # no arm logged a priced decision
    runs = report["deployments"]["dpattn"]["loads"][0]["sets"]["shared-prefix"]["runs"]
    runs["tiersched"] = [{**runs["upstream-lpm"][0], "server_steps": {"prefill_batches": 40, "priced_caps_kept": k,
                                                                      "priced_caps_dropped": d}}
                         for k, d in ((2, 10), (4, 20))]
    assert tables.rows(report)[0]["priced_caps_per_run"] == {"tiersched": (3.0, 15.0)}
    assert "priced LS caps kept / dropped per run: tiersched 3.0 / 15.0" in tables.markdown(report)
