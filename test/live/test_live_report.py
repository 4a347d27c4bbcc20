"""Live-run summaries, A/B ratio orientation and spread, arm flags and tier checks (no server)."""
import pytest

from tiersched.live import arms as live_arms
from tiersched.live.driver import RequestResult, generate_payload
from tiersched.live.report import compare_arms, pair_ratios, summarize
from tiersched.live.requests import LiveRequest


def result(cls="be", ttft=1.0, latency=2.0, tokens=5, cached=0, success=True, finished=True, rank=0, prompt=10):
    r = RequestResult("r", cls, 10 if cls == "ls" else 0, prompt, tokens, success=success, finished=finished,
                      ttft=ttft, latency=latency, completion_tokens=tokens if success else 0, cached_tokens=cached,
                      dp_rank=rank)
    return r


def test_summary_counts_errors_and_lost_and_classes():
    rs = [result("ls", ttft=0.5, cached=4), result("be", ttft=1.5, cached=6, rank=1),
          result(success=False, finished=True), result(success=False, finished=False)]
    s = summarize(rs)
    assert s["errors"] == 1 and s["lost"] == 1 and s["completed"] == 2
    assert s["ls_ttft_mean_s"] == 0.5 and s["be_ttft_mean_s"] == 1.5
    assert s["cached_tokens"] == 10 and s["cached_fraction"] == pytest.approx(0.5)
    assert s["requests_per_rank"] == [3, 1]
    assert s["tpot_mean_s"] == pytest.approx((2.0 - 1.0) / 4)


def test_ratios_favour_ours_above_one_for_both_orientations():
    ours = [{"cached_tokens": 200, "ttft_mean_s": 1.0}, {"cached_tokens": 300, "ttft_mean_s": 2.0}]
    up = [{"cached_tokens": 100, "ttft_mean_s": 2.0}, {"cached_tokens": 100, "ttft_mean_s": 2.0}]
    cached = pair_ratios(ours, up, "cached_tokens")
    assert cached["min"] == 2.0 and cached["max"] == 3.0 and cached["ratio"] == pytest.approx(6 ** 0.5, rel=1e-3)
    ttft = pair_ratios(ours, up, "ttft_mean_s")
    assert ttft["per_repeat"] == [2.0, 1.0]


def test_compare_picks_the_strongest_upstream_arm_per_metric():
    runs = {"tiersched": [{"cached_tokens": 100, "ls_ttft_mean_s": 1.0}],
            "upstream-lpm": [{"cached_tokens": 90, "ls_ttft_mean_s": 3.0}],
            "upstream-priority": [{"cached_tokens": 10, "ls_ttft_mean_s": 0.5}]}
    c = compare_arms(runs, "tiersched")
    assert c["cached_tokens"]["best_upstream"] == "upstream-lpm"
    assert c["ls_ttft_mean_s"]["best_upstream"] == "upstream-priority"
    assert c["ls_ttft_mean_s"]["vs_best"]["ratio"] == 0.5  # honest: worse than the best upstream arm


def test_payload_carries_priority_and_ignores_eos():
    req = LiveRequest("a", 0.0, (5, 6, 7), 4, 10, "ls")
    body = generate_payload(req)
    assert body["priority"] == 10 and body["input_ids"] == [5, 6, 7] and body["stream"] is True
    assert body["sampling_params"]["ignore_eos"] and body["sampling_params"]["max_new_tokens"] == 4
    assert "priority" not in generate_payload(req, send_priority=False)


def test_tiersched_flags_come_from_one_table_and_override_upstream():
    arm = live_arms.tiersched_arm("dp2")
    args = live_arms.server_args("dp2", arm)
    assert args[:2] == ["--dp-size", "2"]
    for tier in arm.tiers:
        for flag in live_arms.TIERSCHED_TIER_FLAGS[tier]:
            assert flag in args
    # each flag once: the tiers' values replace upstream-lpm's
    policies = [args[i + 1] for i, a in enumerate(args) if a == "--schedule-policy"]
    methods = [args[i + 1] for i, a in enumerate(args) if a == "--load-balance-method"]
    assert len(policies) == 1 and len(methods) == 1
    if "request" in arm.tiers:
        assert policies == ["prefix-aging"] and "--enable-priority-scheduling" in args
    if "engine" in arm.tiers:
        assert methods == ["score"]
    assert "expert" not in arm.tiers  # no EPLB in dp2


def test_missing_adapter_is_reported_not_silently_dropped(monkeypatch):
    monkeypatch.setitem(live_arms.TIER_ADAPTER_MODULES, "expert", "tiersched.sglang.no_such_adapter")
    arm = live_arms.tiersched_arm("ep2")
    assert "expert" in arm.skipped_tiers and "no_such_adapter" in arm.skipped_tiers["expert"]
    assert "source_aware" not in " ".join(arm.args)


def test_active_tiers_parsed_from_server_log():
    log = "x\n[tiersched] active tiers: cpu-fixes, request, engine (pid 12)\n[tiersched] active tiers: none (pid 3)\n"
    assert live_arms.active_tiers_in_log(log) == {"cpu-fixes", "request", "engine", "none"}


def test_ablation_arms_one_tier_each_and_not_counted_as_upstream():
    arms = live_arms.arms_for("dp2", ablate=True)
    names = [a.name for a in arms]
    assert names[-1] == "tiersched" and names[:2] == ["upstream-lpm", "upstream-priority"]
    for arm in arms[2:-1]:
        assert len(arm.tiers) == 1 and arm.name == f"tiersched-{arm.tiers[0]}-only"
        for flag in live_arms.TIERSCHED_TIER_FLAGS[arm.tiers[0]]:
            assert flag in arm.args
    runs = {"tiersched": [{"cached_tokens": 10}], "tiersched-engine-only": [{"cached_tokens": 1}],
            "upstream-lpm": [{"cached_tokens": 5}]}
    assert compare_arms(runs, "tiersched")["cached_tokens"]["best_upstream"] == "upstream-lpm"


def test_lockstep_variants_only_under_dp_attention_and_set_through_the_environment():
    dpattn = {a.name: a for a in live_arms.arms_for("dpattn", ablate=True)}
    full = dpattn["tiersched"]
    for name, setting in live_arms.LOCKSTEP_VARIANTS.items():
        arm = dpattn[f"tiersched-{name}"]
        assert arm.args == full.args and arm.tiers == full.tiers
        assert arm.env == {"TIERSCHED_SET": setting}
    assert not any(n.startswith("tiersched-no") for n in (a.name for a in live_arms.arms_for("dp2", ablate=True)))


def test_variant_arm_splits_server_flags_from_tier_settings():
    arm = live_arms.variant_arm("dpattn", "mix", "--enable-mixed-chunk,request.ls_hold_s=0,--chunked-prefill-size=1024")
    assert arm.name == "tiersched-mix" and arm.env == {"TIERSCHED_SET": "request.ls_hold_s=0"}
    assert arm.args[-3:] == ("--enable-mixed-chunk", "--chunked-prefill-size", "1024")
    up = live_arms.variant_arm("dpattn", "mix", "--enable-mixed-chunk", base="upstream-lpm")
    assert up.name == "upstream-lpm-mix" and up.tiers == () and up.env == {}
    assert up.args == (*live_arms.UPSTREAM_ARMS["upstream-lpm"], "--enable-mixed-chunk")
    with pytest.raises(ValueError, match="server flags only"):
        live_arms.variant_arm("dpattn", "x", "request.ls_hold_s=0", base="upstream-lpm")
    with pytest.raises(ValueError, match="unknown arm"):
        live_arms.arms_for("dpattn", only=("tiersched-nosuch",))


def test_server_steps_counts_prefill_batches_and_caps_from_a_log():
    from tiersched.live.ab import server_steps

    log = ("[2026-12-03 09:15:19 DP1 TP1] Prefill batch, #new-seq: 2, #new-token: 956, #cached-token: 48, token "
           "usage: 0.19\n"
           "[2026-12-03 09:15:19 DP0 TP0] Prefill batch, #new-seq: 1, #new-token: 512, #cached-token: 0, x\n"
           "tiersched lockstep cap: BE chunk abc capped to 303 of 1782 tokens\n"
           "[x DP0] tiersched cap pricing: kept 1 dropped 2 LS caps this pass (group 1, model prior; totals kept 1 "
           "dropped 2)\n"
           "[x DP1] tiersched cap pricing: kept 0 dropped 3 LS caps this pass (group 1, model scaled@8; totals kept 0 "
           "dropped 3)\n"
           "[2026-12-03 09:15:21 DP0 TP0] Decode batch, #running-req: 1, gen throughput (token/s): 40.00, #queue\n"
           "[2026-12-03 09:15:22 DP1 TP1] Decode batch, #running-req: 3, gen throughput (token/s): 20.00, #queue\n")
    steps = server_steps(log)
    assert steps == {"prefill_batches": 2, "prefill_new_tokens": 1468, "prefill_seqs": 3,
                     "prefill_cached_tokens": 48, "lockstep_caps_logged": 1, "priced_caps_kept": 1,
                     "priced_caps_dropped": 5, "decode_gen_tok_s_mean": 30.0}
    assert server_steps("")["decode_gen_tok_s_mean"] is None
