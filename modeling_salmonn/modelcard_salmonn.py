"""
SALMONN folders on the Hub: the files that make a folder loadable with remote code, the one model card writer
(converted, saved, pushed, trained and adapter folders), and the model's `save_pretrained` / `push_to_hub`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from string import Template

from transformers.utils import logging


logger = logging.get_logger(__name__)


# The flat module files that make a saved folder loadable with `trust_remote_code=True`.
REMOTE_CODE_FILES = (
    "configuration_salmonn.py",
    "modeling_beats.py",
    "modeling_salmonn.py",
    "feature_extraction_salmonn.py",
    "processing_salmonn.py",
    "integrations_salmonn.py",
    "modelcard_salmonn.py",
    "generation_salmonn.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_salmonn.SalmonnConfig",
    "AutoModel": "modeling_salmonn.SalmonnForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_salmonn.SalmonnForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_salmonn.SalmonnForConditionalGeneration",
    "AutoProcessor": "processing_salmonn.SalmonnProcessor",
    "AutoFeatureExtractor": "feature_extraction_salmonn.SalmonnFeatureExtractor",
}


# Vicuna v1.1 (SALMONN 13B) is a LLaMA 1 fine-tune under LLaMA's non-commercial terms; v1.5 (7B) is a Llama 2 one.
LLAMA1_TERMS = {
    "license": "other",
    "license_name": "llama-license",
    "license_link": "https://huggingface.co/lmsys/vicuna-13b-v1.1",
}
LLAMA2_TERMS = {"license": "llama2"}
LICENSE_FIELDS = ("license", "license_name", "license_link")
# `models--org--name` folders of the Hugging Face cache name the repo a file was downloaded from.
_CACHE_REPO = re.compile(r"models--([^/\\]+?)--([^/\\]+)")

# The card template: the repository's top-level `model_card.md`, installed as package data of `modeling_salmonn`.
CARD_TEMPLATE_NAME = "model_card.md"
# What a card says when the template cannot be found (remote code running where the package is not installed).
FALLBACK_CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: audio-text-to-text
tags:
- salmonn
- custom_code
---

# $title

SALMONN (Tang et al., ICLR 2024, [arXiv:2310.13289](https://arxiv.org/abs/2310.13289)); the LLM carries $lora.
$intro
## Usage

$usage
"""


def _card_template_candidates() -> list[Path]:
    """
    Where `model_card.md` may be: installed beside this file (package data), in the source checkout above it, or
    beside the installed `modeling_salmonn` package when this file runs as remote code from transformers' cache.
    """
    here = Path(__file__).resolve().parent
    folders = [here]
    spec = importlib.util.find_spec("modeling_salmonn")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(location).resolve() for location in spec.submodule_search_locations]
    candidates = []
    for folder in dict.fromkeys(folders):
        candidates.append(folder / CARD_TEMPLATE_NAME)
        if (folder.parent / "setup.py").is_file():  # a source checkout (or editable install) of the package
            candidates.append(folder.parent / CARD_TEMPLATE_NAME)
    return candidates


def card_template() -> str:
    """The text of `model_card.md` (metadata and prose with `$name` placeholders), or a short built-in fallback."""
    for path in _card_template_candidates():
        if path.is_file():
            return path.read_text(encoding="utf-8")
    logger.info("%s not found beside %s; writing a short model card", CARD_TEMPLATE_NAME, __file__)
    return FALLBACK_CARD_TEMPLATE


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """`org/name` that is not a local path: a local folder's name is never taken for a Hub repo."""
    if not name or os.path.exists(name) or os.path.isabs(name) or str(name).startswith("."):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return "/" in str(name)


def hub_id_of(source: str | os.PathLike | None) -> str | None:
    """The Hub repo of `source`: a repo id, or a file or folder inside the Hugging Face cache; None for local paths."""
    if source is None:
        return None
    if is_hub_id(source):
        return str(source)
    match = _CACHE_REPO.search(str(Path(source).resolve()) if os.path.exists(source) else str(source))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def license_for_llm(llm: str | None) -> dict:
    """The license metadata implied by the LLM: Llama 2 terms for Vicuna v1.5, LLaMA 1 terms otherwise."""
    name = (llm or "").lower()
    return dict(LLAMA2_TERMS) if ("v1.5" in name or "llama-2" in name) else dict(LLAMA1_TERMS)


def _source_card(name_or_path: str | None):
    """The card of the folder or (cached) Hub repo a model was loaded from, if there is one on this machine."""
    if not name_or_path:
        return None
    from huggingface_hub import ModelCard

    path = Path(name_or_path) / "README.md"
    if not path.is_file() and is_hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "README.md")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except Exception:  # a hand-written README without valid metadata gives no metadata
        return None


def salmonn_model_card(
    config,
    *,
    base_models: list[str] | None = None,
    license: dict | None = None,
    title: str = "SALMONN (transformers)",
    intro: str = "",
    usage: str | None = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
    library_name: str = "transformers",
):
    """
    SALMONN's `ModelCard`: `model_card.md` rendered with this model's numbers, `intro` and `usage`, its metadata
    completed with the license, library, tags, base models and datasets of this folder.
    """
    from huggingface_hub import ModelCard

    lora = (
        f"LoRA rank {config.lora_rank}, scaling {config.lora_alpha / config.lora_rank:g} (lora_alpha / rank), kept "
        "separate so that the scaling can change"
        if config.lora_rank > 0
        else "LoRA merged into its weights (fixed scaling)"
    )
    text = Template(card_template()).substitute(
        title=title,
        second_per_window=f"{config.second_per_window:g}",
        second_stride=f"{config.second_stride:g}",
        lora=lora,
        intro=intro,
        usage=_model_usage("path/or/repo-id") if usage is None else usage,
        audio_tokens_per_segment=config.audio_tokens_per_segment,
    )
    card = ModelCard(text)
    license = dict(license or LLAMA1_TERMS)
    for name in LICENSE_FIELDS:
        setattr(card.data, name, license.get(name))
    card.data.library_name = library_name
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(tags or [])]))
    card.data.base_model = [name for name in dict.fromkeys(base_models or []) if is_hub_id(name)] or None
    card.data.datasets = datasets or None
    return card


def _model_usage(repo: str) -> str:
    return f"""```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True, dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
inputs = processor(text=processor.format_prompt("Describe the audio."), audio="clip.wav").to(model.device)
ids = model.generate(**inputs)
print(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```"""


def saved_model_card(model, repo_id: str | None = None, tags: list[str] | None = None, datasets: list[str] | None = None):
    """
    The card of a saved or pushed model. What it was loaded from decides the metadata: a Hub repo is its base model;
    a local folder passes on its card's license and base models; a model built from a config has none.
    """
    source = getattr(model.config, "_name_or_path", "") or ""
    source_repo = hub_id_of(source)
    license = dict(LLAMA1_TERMS)
    base_models: list[str] = [source_repo] if source_repo else []
    card = _source_card(source)
    if card is not None:
        metadata = card.data.to_dict()
        if metadata.get("license"):
            license = {name: metadata[name] for name in LICENSE_FIELDS if metadata.get(name)}
        if not source_repo:
            inherited = metadata.get("base_model") or []
            base_models = [inherited] if isinstance(inherited, str) else list(inherited)
    intro = f"\nThis model derives from [{source_repo}](https://huggingface.co/{source_repo}).\n" if source_repo else ""
    return salmonn_model_card(
        model.config,
        base_models=base_models,
        license=license,
        intro=intro,
        usage=_model_usage(repo_id or "path/or/repo-id"),
        tags=tags,
        datasets=datasets,
    )


def adapter_model_card(config, base_model: str | None):
    """The card of a PEFT adapter written by salmonn-train: it names the base SALMONN it applies to."""
    base = base_model or "path/to/base-salmonn"
    license = dict(LLAMA1_TERMS)
    card = _source_card(base_model)
    metadata = card.data.to_dict() if card is not None else {}
    if metadata.get("license"):
        license = {name: metadata[name] for name in LICENSE_FIELDS if metadata.get(name)}
    usage = f"""This folder is a PEFT adapter of the base SALMONN `{base}`: SALMONN's LoRA of the language model and, as
`modules_to_save`, the Q-Former path (window query, Q-Former, `ln_speech`/`ln_audio`, `speech_llama_proj`).

```python
from peft import PeftModel
from transformers import AutoModel, AutoProcessor

base = AutoModel.from_pretrained("{base}", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
processor = AutoProcessor.from_pretrained("{base}", trust_remote_code=True)
```"""
    return salmonn_model_card(
        config,
        base_models=[base_model] if base_model else None,
        license=license,
        title="SALMONN adapter (PEFT)",
        usage=usage,
        tags=["peft", "lora"],
        library_name="peft",
    )


# `save_pretrained(push_to_hub=True, ...)` arguments that describe the upload rather than the files.
HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags")


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Creates the repo if needed and uploads the finished folder in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        commit_message=commit_message or "Upload SALMONN",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def copy_remote_code(folder: str | os.PathLike, overwrite: bool = True) -> None:
    """
    Copies the model's code files into `folder`, which then loads with `trust_remote_code=True` (see `AUTO_MAP`).
    Loaded as remote code, this module sits in transformers' module cache beside only the files the model imports:
    the processor's files then come with the processor's own `save_pretrained`.
    """
    source_dir = Path(__file__).resolve().parent
    for name in REMOTE_CODE_FILES:
        target = Path(folder) / name
        if (source_dir / name).is_file() and (overwrite or not target.exists()):
            shutil.copyfile(source_dir / name, target)


class SalmonnHubMixin:
    """`save_pretrained` / `push_to_hub` of SALMONN models: remote code and SALMONN's card always go with the weights."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """
        Saves weights and config with the remote code and SALMONN's model card, so the folder loads with
        `trust_remote_code=True`; with `push_to_hub=True` the finished folder is uploaded (remote code included).
        """
        hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_remote_code(save_directory, overwrite=False)  # transformers may have copied some already
        if not kwargs.get("is_main_process", True):
            return
        repo_id = hub_kwargs.pop("repo_id", None) or (Path(save_directory).name if push_to_hub else None)
        tags = hub_kwargs.pop("tags", None)
        saved_model_card(self, repo_id=repo_id, tags=tags).save(Path(save_directory) / "README.md")
        if push_to_hub:
            upload_folder_to_hub(save_directory, repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> str:
        """Saves the model (weights, remote code, SALMONN's card) to a temporary folder and uploads all of it."""
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size, repo_id=repo_id, tags=tags)
            return upload_folder_to_hub(
                tmp_dir, repo_id, commit_message=commit_message, commit_description=commit_description,
                private=private, token=token, revision=revision, create_pr=create_pr,
            )
