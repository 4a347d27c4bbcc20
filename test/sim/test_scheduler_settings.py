"""SchedulerSettings carries upstream's prefill-delayer and mixed-chunk flags with upstream's names and defaults."""
import pytest

from tiersched.sim.presets import SchedulerSettings, get_preset


def test_upstream_flag_defaults():
    s = SchedulerSettings()
    assert (s.enable_prefill_delayer, s.prefill_delayer_max_delay_passes, s.prefill_delayer_token_usage_low_watermark,
            s.prefill_delayer_queue_min_ratio, s.prefill_delayer_max_delay_ms, s.enable_mixed_chunk) == \
        (False, 30, None, None, None, False)


def test_defaults_match_upstream_server_args():
    schedule = pytest.importorskip("sglang.srt.arg_groups.fields.schedule").Schedule
    upstream = {name: getattr(schedule(), name) for name in schedule.__struct_fields__}
    ours = SchedulerSettings()
    for name in ("enable_prefill_delayer", "prefill_delayer_max_delay_passes",
                 "prefill_delayer_token_usage_low_watermark", "prefill_delayer_queue_min_ratio",
                 "prefill_delayer_max_delay_ms", "enable_mixed_chunk"):
        assert name in upstream, name
        assert getattr(ours, name) == upstream[name], name


@pytest.mark.parametrize("bad", [dict(prefill_delayer_max_delay_passes=-1),
                                 dict(prefill_delayer_token_usage_low_watermark=1.5),
                                 dict(prefill_delayer_queue_min_ratio=-0.1),
                                 dict(prefill_delayer_max_delay_ms=0.0)])
def test_bad_values_rejected(bad):
    with pytest.raises(ValueError):
        get_preset("qwen3").with_scheduler(**bad)
