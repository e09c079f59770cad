import os
import re
import tempfile

import pytest


# Nothing may be downloaded: every test works offline, with its own Hugging Face cache.
_HF_HOME = tempfile.mkdtemp(prefix="salmonn-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """A random tiny SALMONN and its processor (built once per session; do not modify in place)."""
    from tests.utils import tiny_model_and_processor

    return tiny_model_and_processor()


@pytest.fixture(autouse=True)
def _restore_transformers_verbosity():
    """Commands run in-process set transformers' log level (salmonn-train's --log_level): it must not leak into the
    next tests (transformers' ConfigTester, for one, expects a silent INFO-free config)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(level)


# The skip reasons of transformers' hardware decorators (`require_torch_accelerator`, `require_torch_gpu`,
# `require_torch_multi_accelerator`, `require_large_cpu_ram`'s GPU twins, ...; transformers/testing_utils.py). CI has
# no accelerator, so a test of transformers' common suite that needs one skips by its own reason: a new release that
# adds such a test adds no red. A missing package ("test requires deepspeed", "the kernels library") still fails.
ACCELERATOR_SKIP = re.compile(
    r"test requires (?:(?:multiple |>= \d+ |a |a CUDA |a ROCm \(AMD\) )?"
    r"(?:accelerators?|CUDA|GPUs?|GPU or XPU|NPUs?|XPUs?|HPUs?|MPS|CUDA GPUs|PyTorch (?:NPU|XPU|HPU))\b"
    r"|\d+ GiB of accelerator memory|Ampere)"
)


def is_accelerator_skip(reason: str) -> bool:
    return ACCELERATOR_SKIP.search(reason) is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """
    Under CI=true a skip is a failure: CI installs every optional dependency, so a skip means one is missing. The one
    exception is a test that needs an accelerator, recognised by its skip reason (CI runs on CPUs only).
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if is_accelerator_skip(reason):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every dependency must be installed: {reason}"
