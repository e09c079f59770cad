"""The installed package claims one namespace: `salmonn.*` plus the remote-code package `modeling_salmonn`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import run_fresh_python


CONSOLE_SCRIPTS = (
    "salmonn-demo",
    "salmonn-convert",
    "salmonn-convert-beats",
    "salmonn-infer",
    "salmonn-web",
    "salmonn-train",
    "salmonn-eval",
)


def test_generic_names_are_not_importable_but_the_namespace_is():
    out = run_fresh_python(
        """
        import importlib
        for name in ("conversion", "training", "inference", "evaluation"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                print("absent", name)
            else:
                print("PRESENT", name)
        for name in ("salmonn", "salmonn.conversion.convert_salmonn", "salmonn.training.train",
                     "salmonn.inference.infer", "salmonn.evaluation.evaluate", "modeling_salmonn"):
            importlib.import_module(name)
            print("imported", name)
        """
    )
    assert out.split("\n")[:4] == [f"absent {name}" for name in ("conversion", "training", "inference", "evaluation")]
    assert out.count("imported ") == 6


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_every_console_script_runs(script):
    # the scripts sit beside the interpreter of the environment the package is installed in
    path = shutil.which(script, path=str(Path(sys.executable).parent))
    assert path, f"{script} is not installed"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
