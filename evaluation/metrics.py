"""Metrics for the SALMONN paper's tasks, computed at corpus level as the paper reports them.

Every function takes parallel lists (references, hypotheses) and returns a dict whose first key is the
headline number; the other keys are the counts behind it, so a reader can check the arithmetic. Rates are
percentages (WER, PER, accuracy, following rate); BLEU, ROUGE-L and METEOR are on the usual 0-100 scale.
Optional metrics that cannot run here return `None` with a reason instead of disappearing.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .normalizers import caption_normalize, phone_normalize, words


logger = logging.getLogger(__name__)

Reference = str | Sequence[str]


def _as_list(reference: Reference) -> list[str]:
    if isinstance(reference, str):
        return [reference]
    return [r for r in reference if r is not None]


def _check_parallel(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses")


# --------------------------------------------------------------------------------------------------------
# Error rates


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, int]:
    """Summed word-level edit operations (jiwer) over a corpus of already-normalised strings.

    A reference that is empty after normalisation has no words to align; its hypothesis words are counted as
    insertions (jiwer refuses empty references).
    """
    import jiwer

    _check_parallel(references, hypotheses)
    counts = {"substitutions": 0, "deletions": 0, "insertions": 0, "hits": 0, "reference_words": 0}
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.split()]
    for r, h in zip(references, hypotheses):
        if not r.split():
            counts["insertions"] += len(h.split())
    if pairs:
        out = jiwer.process_words([r for r, _ in pairs], [h if h.split() else "" for _, h in pairs])
        counts["substitutions"] += out.substitutions
        counts["deletions"] += out.deletions
        counts["insertions"] += out.insertions
        counts["hits"] += out.hits
    counts["reference_words"] = counts["substitutions"] + counts["deletions"] + counts["hits"]
    counts["errors"] = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return counts


def word_error_rate(
    references: Sequence[str], hypotheses: Sequence[str], normalizer: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Corpus WER in percent: all errors over all reference words (not a mean of per-utterance WERs)."""
    norm = normalizer or (lambda s: " ".join(s.split()))
    counts = error_counts([norm(r) for r in references], [norm(h) for h in hypotheses])
    wer = 100.0 * counts["errors"] / counts["reference_words"] if counts["reference_words"] else None
    return {"wer": wer, **counts}


def phone_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Corpus PER in percent over whitespace-separated phone labels (see `phone_normalize`)."""
    out = word_error_rate(references, hypotheses, normalizer=phone_normalize)
    return {"per": out.pop("wer"), **out}


# --------------------------------------------------------------------------------------------------------
# BLEU, ROUGE-L, METEOR, SPIDEr


def resolve_bleu_tokenizer(tokenize: str) -> tuple[str, str | None]:
    """`ja-mecab` needs MeCab + ipadic (`pip install sacrebleu[ja]`); fall back to `char` and say why."""
    if tokenize != "ja-mecab":
        return tokenize, None
    try:
        from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

        TokenizerJaMecab()
    except Exception as err:  # ImportError, or MeCab failing to find its dictionary
        note = f"tokenize=ja-mecab unavailable ({type(err).__name__}: {err}); used tokenize=char"
        logger.warning(note)
        return "char", note
    return tokenize, None


def bleu4(
    references: Sequence[Reference],
    hypotheses: Sequence[str],
    tokenize: str = "13a",
    lowercase: bool = False,
) -> dict[str, Any]:
    """Corpus BLEU-4 with sacrebleu (default smoothing, closest reference length).

    Each reference may be a string or a list of strings (any number per item).
    """
    from sacrebleu.metrics import BLEU

    _check_parallel(references, hypotheses)
    tokenize, note = resolve_bleu_tokenizer(tokenize)
    refs = [_as_list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every item needs at least one reference for BLEU")
    n_streams = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n_streams)]
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    score = metric.corpus_score(list(hypotheses), streams)
    out = {
        "bleu4": score.score,
        "precisions": [round(p, 4) for p in score.precisions],
        "brevity_penalty": score.bp,
        "hypothesis_length": score.sys_len,
        "reference_length": score.ref_len,
        "signature": str(metric.get_signature()),
    }
    if note:
        out["note"] = note
    return out


def caption_bleu4(references: Sequence[Reference], hypotheses: Sequence[str]) -> dict[str, Any]:
    """BLEU-4 for captions: on lower-cased, punctuation-free text (coco-caption style input)."""
    refs = [[caption_normalize(r) for r in _as_list(ref)] for ref in references]
    return bleu4(refs, [caption_normalize(h) for h in hypotheses], tokenize="13a")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_sentence(hypothesis: str, references: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L F-score of one hypothesis, coco-caption convention.

    Precision and recall are each maximised over the references, then combined with
    F = (1 + beta^2) P R / (R + beta^2 P); beta = 1.2 as in coco-caption.
    """
    hyp = caption_normalize(hypothesis).split()
    if not hyp:
        return 0.0
    best_p = best_r = 0.0
    for ref in references:
        ref_tokens = caption_normalize(ref).split()
        if not ref_tokens:
            continue
        lcs = lcs_length(hyp, ref_tokens)
        best_p = max(best_p, lcs / len(hyp))
        best_r = max(best_r, lcs / len(ref_tokens))
    if best_p == 0.0 or best_r == 0.0:
        return 0.0
    return (1 + beta**2) * best_p * best_r / (best_r + beta**2 * best_p)


def rouge_l(references: Sequence[Reference], hypotheses: Sequence[str], beta: float = 1.2) -> dict[str, Any]:
    """Mean sentence ROUGE-L (x100) over the corpus."""
    _check_parallel(references, hypotheses)
    scores = [rouge_l_sentence(h, _as_list(r), beta) for r, h in zip(references, hypotheses)]
    return {"rouge_l": 100.0 * sum(scores) / len(scores) if scores else None, "beta": beta}


# Debian's `wordnet-base` holds WordNet 3.0, the database NLTK downloads from outside PyPI; it lacks only the
# `lexnames` index, whose table Debian ships in the lexnames(5) manual page.
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"
DEBIAN_LEXNAMES_PAGE = "/usr/share/man/man5/lexnames.5WN.gz"
_LEXNAME_CATEGORIES = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def _nltk_wordnet_installed() -> bool:
    import nltk

    for resource in ("corpora/wordnet.zip", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            pass
    return False


def _debian_lexnames() -> str | None:
    """`lexnames` in NLTK's format (`NN name category`), from the table of Debian's lexnames(5) page."""
    import gzip
    import os

    if not os.path.isfile(os.path.join(DEBIAN_WORDNET_DIR, "data.noun")) or not os.path.isfile(DEBIAN_LEXNAMES_PAGE):
        return None
    with gzip.open(DEBIAN_LEXNAMES_PAGE, "rt", encoding="utf-8", errors="replace") as handle:
        rows = re.findall(r"^(\d\d)\t\s*((noun|verb|adj|adv)\.\S+)", handle.read(), flags=re.MULTILINE)
    if not rows or [int(number) for number, _, _ in rows] != list(range(len(rows))):
        return None
    return "".join(f"{number}\t{name}\t{_LEXNAME_CATEGORIES[kind]}\n" for number, name, kind in rows)


@functools.lru_cache(maxsize=1)
def debian_wordnet():
    """NLTK's WordNet reader over Debian's WordNet 3.0 (`apt-get install wordnet-base`), or None without it (read once)."""
    import io

    lexnames = _debian_lexnames()
    if lexnames is None:
        return None
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # NLTK reads corpora only under its data paths: authorise this one folder explicitly.
    if DEBIAN_WORDNET_DIR not in nltk.data.path:
        nltk.data.path.append(DEBIAN_WORDNET_DIR)

    class DebianWordNet(WordNetCorpusReader):
        def open(self, fileid):
            return io.StringIO(lexnames) if fileid == "lexnames" else super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None  # this is WordNet 3.0 itself: nothing to map (the map serves only multilingual data)

    return DebianWordNet(DEBIAN_WORDNET_DIR, None)


def meteor_availability() -> str | None:
    """None when NLTK and WordNet (NLTK's data or Debian's `wordnet-base`) are installed, else why METEOR cannot run."""
    try:
        import nltk  # noqa: F401
    except ImportError:
        return "needs nltk (pip install salmonn[eval]) and WordNet (apt-get install wordnet-base)"
    if _nltk_wordnet_installed() or _debian_lexnames() is not None:
        return None
    return "WordNet is not installed: apt-get install wordnet-base (or NLTK's own WordNet data)"


def meteor(references: Sequence[Reference], hypotheses: Sequence[str], wordnet: Any = None) -> dict[str, Any]:
    """Mean sentence METEOR (x100) with NLTK's implementation (METEOR 1.0 style: exact, stem, WordNet synonyms).

    Note: coco-caption's METEOR 1.5 (Java, with paraphrase tables) gives somewhat different numbers.
    `wordnet` replaces NLTK's WordNet reader (tests); without it the installed WordNet data is required.
    """
    _check_parallel(references, hypotheses)
    if wordnet is None:
        reason = meteor_availability()
        if reason:
            return {"meteor": None, "unavailable": reason}
        if _nltk_wordnet_installed():
            from nltk.corpus import wordnet
        else:
            wordnet = debian_wordnet()
    from nltk.translate.meteor_score import meteor_score

    scores = []
    for ref, hyp in zip(references, hypotheses):
        ref_tokens = [caption_normalize(r).split() for r in _as_list(ref)]
        scores.append(meteor_score(ref_tokens, caption_normalize(hyp).split(), wordnet=wordnet))
    return {"meteor": 100.0 * sum(scores) / len(scores) if scores else None, "implementation": "nltk"}


SPIDER_UNAVAILABLE = (
    "SPIDEr = (CIDEr-D + SPICE) / 2; SPICE needs Java and Stanford CoreNLP models downloaded at first use, "
    "which cannot run offline here"
)


def spider(references: Sequence[Reference], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Not computed: reported as unavailable with the reason (see `SPIDER_UNAVAILABLE`)."""
    return {"spider": None, "unavailable": SPIDER_UNAVAILABLE}


# --------------------------------------------------------------------------------------------------------
# Classification-style tasks


def _phrase_in(phrase: str, text: str) -> bool:
    """Whole-word occurrence of a (normalised) phrase in (normalised) text."""
    return bool(phrase) and f" {phrase} " in f" {text} "


def _canonical(text: str, synonyms: dict[str, str]) -> str:
    return " ".join(synonyms.get(w, w) for w in caption_normalize(text).split())


def label_accuracy(
    references: Sequence[str], hypotheses: Sequence[str], synonyms: dict[str, str] | None = None
) -> dict[str, Any]:
    """Accuracy (%) of free-text answers against class labels (emotion, gender).

    The label set is the set of reference labels. An answer is correct when it names the reference label
    (as whole words, after lower-casing and `synonyms`) and no other label: "She sounds happy." is right for
    "happy"; "happy or sad" is wrong.
    """
    _check_parallel(references, hypotheses)
    synonyms = synonyms or {}
    labels = {_canonical(r, synonyms) for r in references}
    labels.discard("")
    correct = 0
    for ref, hyp in zip(references, hypotheses):
        hyp_c = _canonical(hyp, synonyms)
        named = {label for label in labels if _phrase_in(label, hyp_c)}
        correct += named == {_canonical(ref, synonyms)}
    n = len(references)
    return {"accuracy": 100.0 * correct / n if n else None, "correct": correct, "total": n}


_YES = {"yes", "yeah", "yep", "yup", "true", "correct", "same"}
_NO = {"no", "nope", "not", "false", "different", "incorrect"}


def parse_yes_no(answer: Any) -> bool | None:
    """Yes/no reading of a speaker-verification answer; None when it says neither.

    A leading yes/no word decides; otherwise any negation ("not", "n't", "different") means no, and a
    remaining "yes"/"same" means yes: "Not the same speaker." -> False, "The same person." -> True.
    """
    if isinstance(answer, bool):
        return answer
    if isinstance(answer, (int, float)) and answer in (0, 1):
        return bool(answer)
    if not isinstance(answer, str):
        return None
    tokens = words(answer)
    if not tokens:
        return None
    if tokens[0] in _YES - {"same"}:
        return True
    if tokens[0] in {"no", "nope", "false", "incorrect"}:
        return False
    if any(t in _NO or t.endswith("n't") for t in tokens):
        return False
    if any(t in _YES for t in tokens):
        return True
    return None


def verification_accuracy(references: Sequence[Any], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Speaker verification accuracy (%): yes/no answers vs yes/no (or true/false, 1/0) references.

    Answers that say neither yes nor no count as wrong and are reported as `unparsed`.
    """
    _check_parallel(references, hypotheses)
    correct = unparsed = 0
    for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
        ref_bool = parse_yes_no(ref)
        if ref_bool is None:
            raise ValueError(f"speaker verification reference #{i} {ref!r} is not yes/no")
        hyp_bool = parse_yes_no(hyp)
        unparsed += hyp_bool is None
        correct += hyp_bool is ref_bool
    n = len(references)
    return {"accuracy": 100.0 * correct / n if n else None, "correct": correct, "total": n, "unparsed": unparsed}


# --------------------------------------------------------------------------------------------------------
# Instruction following (paper appendix E) and story telling


class StringMatchJudge:
    """Default judge for the open-answer tasks (KE, SQQA, SF, SAC).

    `follows`: the answer is non-empty and, when the item gives the spoken `transcript`, is not a mere
    transcription of it (WER of the answer against the transcript above `copy_max_wer`); transcribing the
    speech instead of doing the task is the failure the paper's following rate measures.
    `correct`: it follows, and one of the reference answers occurs in it as whole words (case and
    punctuation ignored). References may be a list of acceptable answers; `answer_split` (a regex) splits a
    string reference into several, e.g. a comma-separated keyword list, any of which counts.

    A judge is any callable `judge(task, record) -> {"follows": bool, "correct": bool}`, where `record` has
    `id`, `prompt`, `reference`, `hypothesis` and optional `transcript`/`Q`; pass an LLM-based one with
    `--judge module:callable` to reproduce an LLM-judged evaluation.
    """

    def __init__(self, copy_max_wer: float = 20.0, answer_split: dict[str, str] | None = None):
        self.copy_max_wer = copy_max_wer
        self.answer_split = answer_split or {}
        self._normalizer = None

    def copies_transcript(self, transcript: str, hypothesis: str) -> bool:
        if self._normalizer is None:
            from .normalizers import english_normalizer

            self._normalizer = english_normalizer()
        out = word_error_rate([transcript], [hypothesis], normalizer=self._normalizer)
        return out["wer"] is not None and out["wer"] <= self.copy_max_wer

    def __call__(self, task: str, record: dict) -> dict[str, bool]:
        hyp = record.get("hypothesis") or ""
        follows = bool(words(hyp))
        transcript = record.get("transcript")
        if follows and transcript:
            follows = not self.copies_transcript(transcript, hyp)
        answers = []
        for ref in _as_list(record.get("reference") or []):
            pattern = self.answer_split.get(task)
            answers.extend(re.split(pattern, ref) if pattern else [ref])
        hyp_n = caption_normalize(hyp)
        correct = follows and any(_phrase_in(caption_normalize(a), hyp_n) for a in answers)
        return {"follows": follows, "correct": correct}


def following_and_accuracy(task: str, records: Sequence[dict], judge: Callable[[str, dict], dict]) -> dict[str, Any]:
    """Following rate and accuracy (%), both over all items (an answer that does not follow is not correct)."""
    follows = correct = 0
    for record in records:
        verdict = judge(task, record)
        if not isinstance(verdict, dict) or "follows" not in verdict or "correct" not in verdict:
            raise ValueError(f"judge returned {verdict!r} for {record.get('id')!r}; expected {{'follows', 'correct'}}")
        follows += bool(verdict["follows"])
        correct += bool(verdict["follows"]) and bool(verdict["correct"])
    n = len(records)
    return {
        "accuracy": 100.0 * correct / n if n else None,
        "following_rate": 100.0 * follows / n if n else None,
        "correct": correct,
        "followed": follows,
        "total": n,
    }


def story_metrics(hypotheses: Iterable[str], min_words: int = 50) -> dict[str, Any]:
    """Story telling: following rate (%) = stories of at least `min_words` words; diversity = mean number of
    distinct words per story (all stories, lower-cased word tokens)."""
    lengths, distinct = [], []
    for hyp in hypotheses:
        tokens = words(hyp or "")
        lengths.append(len(tokens))
        distinct.append(len(set(tokens)))
    n = len(lengths)
    followed = sum(length >= min_words for length in lengths)
    return {
        "following_rate": 100.0 * followed / n if n else None,
        "diversity": sum(distinct) / n if n else None,
        "followed": followed,
        "total": n,
        "min_words": min_words,
        "mean_words": sum(lengths) / n if n else None,
    }
