"""`score_task` on hand-computed cases for the tasks whose scoring route had no test of its own."""

from __future__ import annotations

import math

import pytest

from salmonn.evaluation.tasks import TASKS, score_task


def _records(pairs):
    return [{"id": str(i), "reference": ref, "hypothesis": hyp} for i, (ref, hyp) in enumerate(pairs)]


def test_pr_phone_error_rate():
    # "HH AH L OW" vs "HH AX L OW W": one substitution (AH -> AX) and one insertion (W) over 4 phones
    out = score_task(TASKS["pr"], _records([("hh ah l ow", "HH, AX, L, OW, W"), ("S IY", "S IY")]))
    assert out["metrics"] == {"per": pytest.approx(100 * 2 / 6)}
    details = out["details"]["per"]
    assert (details["substitutions"], details["insertions"], details["deletions"], details["reference_words"]) == (1, 1, 0, 6)


def test_osr_word_error_rate_with_the_english_normaliser():
    # Punctuation and case go; "word" for "world" is one substitution over 4 words; "mister" is "mr" for Whisper's normaliser
    out = score_task(TASKS["osr"], _records([("Hello world. Good morning!", "hello word good morning"), ("Mr Smith", "mister smith")]))
    assert out["metrics"] == {"wer": pytest.approx(100 * 1 / 6)}
    assert out["details"]["wer"]["substitutions"] == 1 and out["details"]["wer"]["errors"] == 1


def test_en2de_bleu_13a():
    # 6 tokens each; n-gram matches 5/6, 3/5, 2/4, 1/3; equal lengths: no brevity penalty
    out = score_task(TASKS["en2de"], _records([("die Katze sitzt auf einer Matte", "die Katze sitzt auf der Matte")]))
    assert out["metrics"]["bleu4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert out["details"]["bleu4"]["precisions"] == [pytest.approx(100 * 5 / 6, abs=1e-4), 60.0, 50.0, pytest.approx(100 / 3, abs=1e-4)]
    assert out["details"]["bleu4"]["brevity_penalty"] == 1.0


def test_en2zh_bleu_on_characters():
    # zh tokenisation: one token per character; 7 characters, the last differs: 6/7, 5/6, 4/5, 3/4
    out = score_task(TASKS["en2zh"], _records([("我很喜欢这只狗", "我很喜欢这只猫")]))
    assert out["metrics"]["bleu4"] == pytest.approx(100 * (3 / 7) ** 0.25)
    assert "tok:zh" in out["details"]["bleu4"]["signature"]


def test_en2ja_bleu_on_mecab_tokens():
    # MeCab: 私 は 猫 が 好き です 。 vs 私 は 猫 が 大好き です 。 -> matches 6/7, 4/6, 2/5, 1/4
    out = score_task(TASKS["en2ja"], _records([("私は猫が好きです。", "私は猫が大好きです。")]))
    assert out["metrics"]["bleu4"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    details = out["details"]["bleu4"]
    assert "note" not in details and "tok:ja-mecab" in details["signature"]  # MeCab ran, no fallback to characters


def test_er_label_accuracy_with_synonyms():
    out = score_task(
        TASKS["er"],
        _records([
            ("happy", "She sounds happy."),  # right
            ("sad", "Sadness."),  # right through the synonym
            ("angry", "happy or angry"),  # names two labels: wrong
            ("neutral", "I don't know"),  # names none: wrong
        ]),
    )
    assert out["metrics"] == {"accuracy": 50.0}
    assert out["details"]["accuracy"] == {"accuracy": 50.0, "correct": 2, "total": 4}


def test_mc_caption_metrics_with_several_references():
    out = score_task(
        TASKS["mc"],
        [
            {"id": "0", "reference": ["a calm piano melody plays", "soft piano music"], "hypothesis": "A calm piano melody plays."},
            {"id": "1", "reference": ["a fast drum beat"], "hypothesis": "a drum beat"},
        ],
    )
    metrics = out["metrics"]
    assert set(metrics) == {"bleu4", "rouge_l", "meteor", "spider"}
    # ROUGE-L (beta 1.2): item 0 is exact (1); item 1 has LCS 3, P 3/3, R 3/4
    f1 = (1 + 1.2**2) * 1 * 0.75 / (0.75 + 1.2**2 * 1)
    assert metrics["rouge_l"] == pytest.approx(100 * (1 + f1) / 2)
    # METEOR (nltk, Debian's WordNet): item 0: 5 matches in 1 chunk; item 1: P 1, R 3/4, 2 chunks of 3 matches
    meteor_1 = (1 * 0.75 / (0.9 * 1 + 0.1 * 0.75)) * (1 - 0.5 * (2 / 3) ** 3)
    assert metrics["meteor"] == pytest.approx(100 * ((1 - 0.5 * (1 / 5) ** 3) + meteor_1) / 2)
    # Corpus BLEU: 5 + 3 hypothesis tokens against the closest reference lengths 5 + 4. N-gram matches: 1-grams
    # 5/5 + 3/3; 2-grams 4/4 + 1/2 ("drum beat", not "a drum"); 3-grams 3/3 + 0/1; 4-grams 2/2 + none.
    bleu = out["details"]["bleu4"]
    assert bleu["hypothesis_length"] == 8 and bleu["reference_length"] == 9
    assert metrics["bleu4"] == pytest.approx(100 * math.exp(1 - 9 / 8) * (1 * 5 / 6 * 3 / 4 * 1) ** 0.25)
    assert metrics["spider"] is None and "SPICE" in out["unavailable"]["spider"]


def test_sac_following_rate_and_accuracy_with_the_default_judge():
    out = score_task(
        TASKS["sac"],
        _records([
            ("a dog", "I can hear a dog barking."),  # follows, right
            ("rain", ""),  # does not follow
            ("a car", "It is a bus."),  # follows, wrong
            (["piano", "keyboard"], "Keyboard music."),  # follows, right through the second answer
        ]),
    )
    assert out["metrics"] == {"accuracy": 50.0, "following_rate": 75.0}
    assert out["details"]["accuracy"]["correct"] == 2 and out["details"]["accuracy"]["followed"] == 3
