"""Text normalisers used before scoring.

WER is computed after Whisper's English normaliser with its full spelling map, as is usual for Whisper-based ASR:
the `whisper-normalizer` package ships both (the `eval` extra installs it), so nothing is downloaded at run time.
`--spelling_mapping file.json` replaces the spelling map (transformers' copy of the normaliser then applies it).
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections.abc import Callable
from pathlib import Path


def load_spelling_mapping(path: str | Path | None) -> dict[str, str] | None:
    """A `{british: american}` JSON file (e.g. Whisper's `english.json`); None keeps Whisper's own mapping."""
    if path is None:
        return None
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--spelling_mapping {path}: cannot read a JSON object ({err})") from err
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"--spelling_mapping {path}: expected a JSON object of string -> string")
    return mapping


def english_normalizer(spelling_mapping: dict[str, str] | None = None) -> Callable[[str], str]:
    """
    Whisper's English normaliser with its full British -> American spelling map (about 1,700 words, shipped by the
    `whisper-normalizer` package), as Whisper-based ASR results are reported; a given mapping replaces that map.
    """
    if spelling_mapping is not None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        return EnglishTextNormalizer(spelling_mapping)
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as err:
        raise ImportError(
            "The English WER normaliser needs the whisper-normalizer package: pip install 'salmonn[eval]'"
        ) from err
    return EnglishTextNormalizer()


def basic_normalizer() -> Callable[[str], str]:
    """transformers' language-independent Whisper normaliser (lower case, no punctuation or brackets)."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def identity_normalizer(text: str) -> str:
    return " ".join(text.split())


def get_text_normalizer(name: str, spelling_mapping: dict[str, str] | None = None) -> Callable[[str], str]:
    if name == "english":
        return english_normalizer(spelling_mapping)
    if name == "basic":
        return basic_normalizer()
    if name == "none":
        return identity_normalizer
    raise ValueError(f"--normalizer must be one of english, basic, none; got {name!r}")


_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def caption_normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: the coco-caption style text the caption metrics use."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT_TABLE)
    return " ".join(text.split())


def phone_normalize(text: str) -> str:
    """Phone strings: upper case, separators (commas, slashes, brackets) dropped, single spaces.

    Phone labels are compared as given, stress digits included (`AH0` != `AH1`).
    """
    text = re.sub(r"[,;/|()\[\]{}]", " ", text.upper())
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Word tokens for counting (story length, distinct words): lower-cased runs of letters, digits, apostrophes."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)*", unicodedata.normalize("NFKC", text).lower())
