"""Optional dependencies: a missing one ends a command with one line that names the extra to install."""

from __future__ import annotations

import importlib.util


# The optional modules each extra of setup.py installs (first match wins when a module is in several).
EXTRA_MODULES = {
    "train": ("datasets",),
    "eval": ("jiwer", "sacrebleu", "whisper_normalizer", "datasets"),
    "quant": ("optimum",),
    "demo": ("gradio",),
    "vllm": ("vllm",),
}


def missing_extra_message(err: ImportError, program: str, preferred_extra: str | None = None) -> str | None:
    """`program: error: ... pip install 'salmonn[extra]'` for an optional module that is missing, else None."""
    missing = None
    cause: BaseException | None = err
    while cause is not None and missing is None:
        if isinstance(cause, ImportError) and cause.name:
            missing = cause.name.split(".")[0]
        cause = cause.__cause__
    if missing is None:
        return None
    extras = [extra for extra, modules in EXTRA_MODULES.items() if missing in modules]
    if not extras:
        return None
    extra = preferred_extra if preferred_extra in extras else extras[0]
    return f"{program}: error: the optional package {missing!r} is not installed; run pip install 'salmonn[{extra}]'"


def require_vllm() -> None:
    """`--engine vllm`: a missing vLLM is found before anything is read, loaded or written (see `missing_extra_message`)."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except ValueError:  # sys.modules["vllm"] is None: marked as not importable
        found = False
    if not found:
        raise ModuleNotFoundError("No module named 'vllm'", name="vllm")
