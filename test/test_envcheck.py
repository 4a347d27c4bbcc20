from tiersched.envcheck import main, problems


def test_pinned_cpu_environment_is_clean():
    assert problems({"sglang": "0.5.23", "torch": "2.13.0+cpu", "numpy": "2.0"}, cpu=True) == []


def test_cuda_packages_in_cpu_env_are_one_sentence_each():
    found = problems({"sglang": "0.5.23", "torch": "2.14.1", "nvidia-cublas": "13", "triton": "3"}, cpu=True)
    assert len(found) == 2
    assert "CUDA packages (nvidia-cublas, triton)" in found[0] and "scripts/setup.sh" in found[0]
    assert found[1].startswith("torch 2.14.1 is not a CPU build")


def test_wrong_or_missing_sglang():
    assert problems({"sglang": "0.5.9"}, cpu=False)[0].startswith("sglang 0.5.9 is installed but tiersched is pinned to 0.5.23")
    assert problems({}, cpu=False)[0].startswith("sglang is not installed")


def test_this_environment_passes():
    assert main(["--cpu"]) == 0
