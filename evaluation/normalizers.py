"""Text normalisers used before scoring.

WER is computed after transformers' Whisper English normaliser
(`transformers.models.whisper.english_normalizer.EnglishTextNormalizer`), as is usual for Whisper-based ASR.
That normaliser expects a British-to-American spelling mapping, which Whisper ships as `english.json` and
which transformers normally downloads with a tokenizer. Nothing may be downloaded here, so the mapping is
either a file the user passes (`--spelling_mapping english.json`, the usual Whisper file works) or the
small built-in `DEFAULT_SPELLING_MAPPING` below (common -our/-re/-ise/-yse/-ll- words). Text that uses
none of the mapped words is normalised exactly as with the full mapping.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections.abc import Callable
from pathlib import Path


# A short British -> American spelling list, written for this project. Whisper's full list has ~1,700
# entries; pass it with `--spelling_mapping` to reproduce Whisper-normalised numbers exactly.
DEFAULT_SPELLING_MAPPING: dict[str, str] = {
    "aeroplane": "airplane",
    "aeroplanes": "airplanes",
    "analyse": "analyze",
    "analysed": "analyzed",
    "analysing": "analyzing",
    "apologise": "apologize",
    "apologised": "apologized",
    "armour": "armor",
    "behaviour": "behavior",
    "behaviours": "behaviors",
    "cancelled": "canceled",
    "cancelling": "canceling",
    "catalogue": "catalog",
    "centre": "center",
    "centres": "centers",
    "cheque": "check",
    "colour": "color",
    "coloured": "colored",
    "colours": "colors",
    "defence": "defense",
    "dialogue": "dialog",
    "endeavour": "endeavor",
    "favour": "favor",
    "favourite": "favorite",
    "favourites": "favorites",
    "flavour": "flavor",
    "grey": "gray",
    "harbour": "harbor",
    "honour": "honor",
    "honoured": "honored",
    "humour": "humor",
    "jewellery": "jewelry",
    "labour": "labor",
    "litre": "liter",
    "litres": "liters",
    "metre": "meter",
    "metres": "meters",
    "mould": "mold",
    "neighbour": "neighbor",
    "neighbours": "neighbors",
    "neighbourhood": "neighborhood",
    "offence": "offense",
    "organisation": "organization",
    "organise": "organize",
    "organised": "organized",
    "plough": "plow",
    "practise": "practice",
    "programme": "program",
    "programmes": "programs",
    "realise": "realize",
    "realised": "realized",
    "recognise": "recognize",
    "recognised": "recognized",
    "rumour": "rumor",
    "savour": "savor",
    "splendour": "splendor",
    "theatre": "theater",
    "travelled": "traveled",
    "traveller": "traveler",
    "travelling": "traveling",
    "tyre": "tire",
    "tyres": "tires",
    "valour": "valor",
    "vapour": "vapor",
    "vigour": "vigor",
}


def load_spelling_mapping(path: str | Path | None) -> dict[str, str]:
    """The built-in mapping, or a `{british: american}` JSON file (e.g. Whisper's `english.json`)."""
    if path is None:
        return dict(DEFAULT_SPELLING_MAPPING)
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--spelling_mapping {path}: cannot read a JSON object ({err})") from err
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"--spelling_mapping {path}: expected a JSON object of string -> string")
    return mapping


def english_normalizer(spelling_mapping: dict[str, str] | None = None) -> Callable[[str], str]:
    """transformers' Whisper English normaliser with an offline spelling mapping."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(DEFAULT_SPELLING_MAPPING if spelling_mapping is None else spelling_mapping)


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
