"""The manifest check is the pin-bump alarm: it must pass on the pinned upstream and fail loudly otherwise."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiersched.patches import ManifestError, check, fingerprint, load_manifest, patches_dir


def test_check_passes_on_pinned_upstream():
    result = subprocess.run([sys.executable, "-m", "tiersched.patches", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "0 problem(s)" in result.stdout


def test_every_row_has_a_pr_writeup():
    import glob
    import os

    for toml in glob.glob(os.path.join(patches_dir(), "*.toml")):
        assert os.path.exists(toml[:-5] + ".md"), f"{toml} has no PR write-up {toml[:-5]}.md"


def _copy_manifest(tmp_path):
    target = tmp_path / "patches"
    shutil.copytree(patches_dir(), target)
    return target


def test_wrong_fingerprint_fails_with_readable_diff(tmp_path, monkeypatch, capsys):
    """The CLI's own main() in this process (the subprocess run above covers `python -m`): it reads the folder
    from TIERSCHED_PATCHES_DIR, exits 1 and names the changed target with both fingerprints."""
    from tiersched.patches.__main__ import main

    directory = _copy_manifest(tmp_path)
    path = directory / "cpu-fixes.toml"
    text = path.read_text()
    good = fingerprint("sglang.srt.layers.moe.fused_moe_native.moe_forward_native")
    assert good in text
    path.write_text(text.replace(good, "sha256:000000000000000000000000"))
    monkeypatch.setenv("TIERSCHED_PATCHES_DIR", str(directory))
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "CHANGED  sglang.srt.layers.moe.fused_moe_native.moe_forward_native" in out
    assert f"!= installed {good}" in out


def test_moved_target_is_reported_missing(tmp_path):
    rows = load_manifest()
    moved = [r.__class__(**{**r.__dict__, "target": r.target + "_renamed_upstream"}) for r in rows[:1]]
    result = check(moved, with_registry=False)
    assert len(result.problems) == 1 and result.problems[0].startswith("MISSING")


def test_unlisted_hook_is_reported(tmp_path):
    rows = load_manifest()
    result = check(rows[1:], with_registry=True)
    assert any(p.startswith("UNLISTED " + rows[0].target) for p in result.problems)


def test_duplicate_and_malformed_rows_rejected(tmp_path):
    (tmp_path / "a.toml").write_text('[[patch]]\ntarget = "x.y"\nhook = "sideways"\nadapter = "a"\npurpose = "p"\nfingerprint = ""\n')
    with pytest.raises(ManifestError, match="hook must be one of"):
        load_manifest(str(tmp_path))
    (tmp_path / "a.toml").write_text('[[patch]]\ntarget = "x.y"\n')
    with pytest.raises(ManifestError, match="lacks hook"):
        load_manifest(str(tmp_path))


def test_manifest_folder_is_the_checkouts_patches_unless_named(tmp_path, monkeypatch):
    monkeypatch.delenv("TIERSCHED_PATCHES_DIR", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert Path(patches_dir()) == repo / "patches"
    assert patches_dir(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        patches_dir(str(tmp_path / "missing"))
