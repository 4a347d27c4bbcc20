import pytest

from tiersched.config import TIER_NAMES, ConfigError, load_config, parse_tiers


def test_defaults_activate_every_tier():
    config = load_config({})
    assert config.tiers == TIER_NAMES
    assert set(config.sections) == set(TIER_NAMES)


def test_unknown_tier_is_one_clear_sentence():
    with pytest.raises(ConfigError, match="unknown tier.*bogus.*request, engine, expert"):
        parse_tiers("request,bogus")


def test_tiers_subset():
    assert load_config({"TIERSCHED_TIERS": "engine"}).tiers == ("engine",)


def test_unknown_section_and_key_in_file(tmp_path):
    bad_section = tmp_path / "a.toml"
    bad_section.write_text("[scheduler]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"\[scheduler\]"):
        load_config({"TIERSCHED_CONFIG": str(bad_section)})
    bad_key = tmp_path / "b.toml"
    bad_key.write_text("[request]\nno_such_knob = 1\n")
    with pytest.raises(ConfigError, match="no_such_knob"):
        load_config({"TIERSCHED_CONFIG": str(bad_key)})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"TIERSCHED_CONFIG": str(tmp_path / "nope.toml")})
    broken = tmp_path / "c.toml"
    broken.write_text("[request\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"TIERSCHED_CONFIG": str(broken)})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="tier.key=value"):
        load_config({"TIERSCHED_SET": "aging_rate=2"})
    with pytest.raises(ConfigError, match="has no key"):
        load_config({"TIERSCHED_SET": "engine.no_such_knob=2"})
