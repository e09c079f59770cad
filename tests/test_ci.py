"""The test suite's own rules: under CI=true a skipped test fails."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.utils import REPO_ROOT


def _run_pytest(tmp_path, ci: str) -> subprocess.CompletedProcess:
    test_file = tmp_path / "test_skips.py"
    test_file.write_text(
        "import pytest\n\n"
        "def test_needs_a_missing_package():\n"
        "    pytest.importorskip('a_package_that_is_not_installed')\n\n"
        "@pytest.mark.skipif(True, reason='no such tool')\n"
        "def test_needs_a_missing_tool():\n"
        "    pass\n\n"
        "def test_runs():\n"
        "    pass\n"
    )
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
