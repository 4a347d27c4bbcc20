"""The prompt checks at the tokenizer-manager boundary and the start-up report of the tiers in effect, in-process:
the hook runs around upstream's own `TokenizerManager._validate_one_request` (on a TokenizerManager made with
`__new__`, holding only what that method reads), so a rejected prompt never reaches upstream's checks and an
accepted one gets all of them. Real-server behaviour (HTTP 400, server healthy): test_fault_server.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tiersched.sglang.input_validation import prompt_error, validate_prompt
from tiersched.sglang.in_effect import in_effect

VOCAB = 512


def test_empty_prompt_and_out_of_vocabulary_ids_are_named():
    assert prompt_error([], VOCAB) == "The prompt is empty: send at least one token (non-empty text or input_ids)."
    msg = prompt_error([1, 2, 512, 3], VOCAB)
    assert "input_ids[2] = 512" in msg and "vocabulary has 512 tokens" in msg
    assert "input_ids[0] = -1" in prompt_error([-1], VOCAB)
    assert prompt_error([0, 511], VOCAB) is None
    assert prompt_error([10 ** 9], None) is None  # vocabulary unknown: only emptiness is checked


def test_hook_raises_before_upstream_and_passes_good_prompts_through():
    pytest.importorskip("sglang.srt.managers.tokenizer_manager")
    from sglang.srt.managers.io_struct import GenerateReqInput

    calls = []

    def upstream(self, obj, input_ids):
        calls.append(list(input_ids))

    manager = SimpleNamespace(model_config=SimpleNamespace(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="prompt is empty"):
        validate_prompt(upstream, manager, GenerateReqInput(text=""), [])
    with pytest.raises(ValueError, match=r"input_ids\[1\] = 9999 .* vocabulary has 512 tokens"):
        validate_prompt(upstream, manager, GenerateReqInput(input_ids=[5, 9999]), [5, 9999])
    assert calls == []
    validate_prompt(upstream, manager, GenerateReqInput(input_ids=[5, 6]), [5, 6])
    assert calls == [[5, 6]]


def test_upstream_turns_our_error_into_http_400():
    """http_server answers a ValueError from the tokenizer manager with `_create_error_response`: status 400."""
    pytest.importorskip("sglang.srt.entrypoints.http_server")
    from sglang.srt.entrypoints.http_server import _create_error_response

    response = _create_error_response(ValueError(prompt_error([], VOCAB)))
    assert response.status_code == 400 and b"prompt is empty" in response.body


def args(**kw):
    base = dict(schedule_policy="lpm", load_balance_method="round_robin", dp_size=2, enable_eplb=False,
                eplb_algorithm="auto")
    return SimpleNamespace(**{**base, **kw})


LOADED = ("cpu-fixes", "input-validation", "request", "engine", "expert")


def test_active_tiers_follow_the_servers_flags():
    assert in_effect(LOADED, args()) == ["cpu-fixes", "input-validation"]
    assert in_effect(LOADED, args(schedule_policy="prefix-aging")) == ["cpu-fixes", "input-validation", "request"]
    assert in_effect(LOADED, args(load_balance_method="score")) == ["cpu-fixes", "input-validation", "engine"]
    assert in_effect(LOADED, args(load_balance_method="score", dp_size=1)) == ["cpu-fixes", "input-validation"]
    assert in_effect(LOADED, args(eplb_algorithm="source_aware")) == ["cpu-fixes", "input-validation"]
    assert in_effect(LOADED, args(eplb_algorithm="source_aware", enable_eplb=True))[-1] == "expert"
    everything = args(schedule_policy="prefix-aging", load_balance_method="score", enable_eplb=True,
                      eplb_algorithm="source_aware_hierarchical")
    assert in_effect(LOADED, everything) == list(LOADED)
    assert in_effect(("input-validation", "request"), everything) == ["input-validation", "request"]


def test_report_line_is_what_the_live_runs_read(monkeypatch, capsys):
    from tiersched.live.arms import active_tiers_in_log
    from tiersched.sglang import in_effect as report
    from tiersched.sglang import plugin

    monkeypatch.setattr(plugin, "STATE", plugin.PluginState(True, None, LOADED))
    report.report_tiers_in_effect(None, args(schedule_policy="prefix-aging"))
    line = capsys.readouterr().err
    assert line.startswith("[tiersched] active tiers: cpu-fixes, input-validation, request (pid ")
    assert "loaded but not selected by the server's flags: engine, expert" in line
    assert active_tiers_in_log(line) == {"cpu-fixes", "input-validation", "request"}
