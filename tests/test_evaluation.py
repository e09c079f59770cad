"""Tests of the evaluation harness: metrics on hand-computed cases, the CLI paths, prompts and resumption."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from salmonn.audio_hash import audio_hash
from salmonn.evaluation import metrics
from salmonn.evaluation.evaluate import _load_joined_audio, main
from salmonn.evaluation.items import build_prompt, load_manifest
from salmonn.evaluation.results import latest_by_id, read_predictions
from salmonn.evaluation.normalizers import english_normalizer, load_spelling_mapping
from salmonn.evaluation.tasks import PAPER_TABLE3, TASKS, get_task, score_task


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- WER / PER

ASR_REFS = ["Hello, World!", "The colour is grey.", "a cat sat on the mat"]
ASR_HYPS = ["hello world", "the color is gray", "a big cat sat on mat"]


def test_wer_is_corpus_level_after_normalisation():
    out = metrics.word_error_rate(ASR_REFS, ASR_HYPS, english_normalizer())
    # after normalisation only item 3 has errors: "big" inserted, "the" deleted -> 2 errors / 12 words
    assert out["errors"] == 2 and out["deletions"] == 1 and out["insertions"] == 1
    assert out["reference_words"] == 12
    assert out["wer"] == pytest.approx(100 * 2 / 12)
    # the mean of per-utterance WERs would be (0 + 0 + 2/6) / 3 = 11.1 %, not the corpus 16.7 %
    assert out["wer"] != pytest.approx(100 * (2 / 6) / 3)


def test_wer_without_normalisation_counts_case_punctuation_and_spelling():
    out = metrics.word_error_rate(ASR_REFS, ASR_HYPS)
    # "Hello," "World!" (2 subs), "The" "colour" "grey." (3 subs), item 3 (2) -> 7 / 12
    assert out["errors"] == 7 and out["wer"] == pytest.approx(100 * 7 / 12)


def test_wer_empty_reference_counts_insertions():
    out = metrics.word_error_rate(["", "one"], ["extra words", "one"])
    assert out["insertions"] == 2 and out["reference_words"] == 1 and out["wer"] == pytest.approx(200.0)


def test_wer_uses_whispers_full_spelling_map():
    # None of these British spellings but "centre" was in the 65-word map this project used to ship (WER 50 %).
    ref = "The paediatric anaesthetist catalogued the aluminium manoeuvres at the centre."
    hyp = "the pediatric anesthetist cataloged the aluminum maneuvers at the center"
    norm = english_normalizer()
    assert norm(ref) == norm(hyp) == "the pediatric anesthetist cataloged the aluminum maneuvers at the center"
    out = metrics.word_error_rate([ref, "Mr. Smith paid £20 for twenty-one colour programmes"], [hyp, "mister smith paid 20 pounds for 21 color programs"], norm)
    assert norm("Mr. Smith paid £20 for twenty-one colour programmes") == "mister smith paid £20 for 21 color programs"
    assert out["reference_words"] == 18 and out["errors"] == 0 and out["wer"] == 0.0  # "20 pounds" -> "£20" too
    partial = metrics.word_error_rate([ref], [hyp], english_normalizer({"centre": "center"}))
    assert partial["errors"] == 5 and partial["wer"] == pytest.approx(50.0)
    assert load_spelling_mapping(None) is None


def test_spelling_mapping_file(tmp_path):
    f = tmp_path / "english.json"
    f.write_text(json.dumps({"aluminium": "aluminum"}))
    norm = english_normalizer(load_spelling_mapping(f))
    assert norm("Aluminium colour") == "aluminum colour"
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="english.json"):
        load_spelling_mapping(f)


def test_per():
    out = metrics.phone_error_rate(["HH AH0 L OW1", "K AE1 T"], ["hh ah0 l ow1", "K AE T D"])
    # 7 reference phones; AE1 -> AE substituted, D inserted
    assert (out["substitutions"], out["insertions"], out["reference_words"]) == (1, 1, 7)
    assert out["per"] == pytest.approx(100 * 2 / 7)


# ---------------------------------------------------------------------------------------------------- BLEU / ROUGE


def test_bleu_zh_tokenisation():
    ref, hyp = "今天天气很好我们去公园", "今天天气很好"
    zh = metrics.bleu4([ref], [hyp], tokenize="zh")
    # per character: every n-gram of the 6-character hypothesis matches; BP = exp(1 - 11/6)
    assert zh["precisions"] == [100.0] * 4
    assert zh["bleu4"] == pytest.approx(100 * math.exp(1 - 11 / 6), abs=1e-6)
    # with the English 13a tokenizer both sides are one "word" each, and they differ
    assert metrics.bleu4([ref], [hyp], tokenize="13a")["bleu4"] < 1.0


def test_bleu_multi_reference_and_ja_fallback(monkeypatch):
    out = metrics.bleu4([["the cat sat", "a cat sat on the mat"], ["dog runs"]], ["a cat sat on the mat", "dog runs"])
    assert out["bleu4"] == pytest.approx(100.0)
    monkeypatch.setitem(sys.modules, "sacrebleu.tokenizers.tokenizer_ja_mecab", None)  # import fails
    tokenize, note = metrics.resolve_bleu_tokenizer("ja-mecab")
    assert tokenize == "char" and "ja-mecab unavailable" in note
    assert "note" in metrics.bleu4(["今日は晴れ"], ["今日は晴れ"], tokenize="ja-mecab")


def test_rouge_l_hand_computed():
    # hyp "the dog barks" vs "a dog barks loudly": LCS 2, P 2/3, R 1/2; F = 2.44 P R / (R + 1.44 P)
    p, r = 2 / 3, 1 / 2
    f1 = 2.44 * p * r / (r + 1.44 * p)
    assert metrics.rouge_l_sentence("the dog barks", ["a dog barks loudly"]) == pytest.approx(f1)
    # second reference gives P 1 (LCS 3 / 3) and R 3/5; max P and max R are combined
    f2 = 2.44 * 1 * 0.6 / (0.6 + 1.44)
    assert metrics.rouge_l_sentence(
        "The dog barks!", ["a dog barks loudly", "the dog barks at night"]
    ) == pytest.approx(f2)
    out = metrics.rouge_l(
        [["a dog barks loudly"], ["a dog barks loudly", "the dog barks at night"]], ["the dog barks", "the dog barks"]
    )
    assert out["rouge_l"] == pytest.approx(100 * (f1 + f2) / 2)
    assert metrics.rouge_l_sentence("", ["x"]) == 0.0


def test_caption_metrics_report_unavailable_not_omitted(monkeypatch):
    monkeypatch.setattr(metrics, "meteor_availability", lambda: "no wordnet here")
    out = score_task(TASKS["aac"], [{"id": "1", "reference": ["a dog barks"], "hypothesis": "a dog barks"}])
    assert set(out["metrics"]) == {"bleu4", "rouge_l", "meteor", "spider"}
    assert out["metrics"]["meteor"] is None and out["unavailable"]["meteor"] == "no wordnet here"
    assert out["metrics"]["spider"] is None and "SPICE" in out["unavailable"]["spider"]
    assert out["metrics"]["rouge_l"] == pytest.approx(100.0)


def test_meteor_with_nltk_and_a_stand_in_wordnet():
    class NoSynonyms:
        def synsets(self, word):
            return []

    out = metrics.meteor([["a dog is barking"]], ["A dog is barking."], wordnet=NoSynonyms())
    # 4 exact matches in one chunk: Fmean 1, penalty 0.5 * (1/4)^3
    assert out["meteor"] == pytest.approx(100 * (1 - 0.5 * 0.25**3))


def test_meteor_with_debian_wordnet_matches_synonyms():
    """CI installs nltk (the eval extra) and Debian's wordnet-base: METEOR runs with real WordNet synonyms."""
    assert metrics.meteor_availability() is None
    assert metrics.debian_wordnet().synsets("car")[0].lexname() == "noun.artifact"
    out = metrics.meteor([["the auto is red"]], ["The car is red."])
    # "car" ~ "auto" through WordNet: 4 matches in one chunk, as if exact
    assert out == {"meteor": pytest.approx(100 * (1 - 0.5 * 0.25**3)), "implementation": "nltk"}
    # Without synonyms: 3 matches (P = R = 3/4) in 2 chunks
    no_synonyms = metrics.meteor([["the auto is red"]], ["The car is red."], wordnet=type("W", (), {"synsets": lambda self, w: []})())
    assert no_synonyms["meteor"] == pytest.approx(100 * 0.75 * (1 - 0.5 * (2 / 3) ** 3))


# ---------------------------------------------------------------------------------------------------- accuracy


def test_label_accuracy():
    refs = ["happy", "sad", "angry", "neutral"]
    hyps = ["She sounds happy.", "happy or sad", "Anger.", "unhappy"]
    out = metrics.label_accuracy(refs, hyps, {"anger": "angry"})
    # 1 right; 2 names two labels; 3 right via synonym; 4 "unhappy" is not the word "neutral"
    assert (out["correct"], out["total"]) == (2, 4) and out["accuracy"] == pytest.approx(50.0)
    gender = score_task(
        TASKS["gr"],
        [
            {"id": "a", "reference": "female", "hypothesis": "A woman."},
            {"id": "b", "reference": "male", "hypothesis": "female"},
        ],
    )
    assert gender["metrics"]["accuracy"] == pytest.approx(50.0)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes.", True),
        ("yes, it is the same person", True),
        ("The same speaker.", True),
        ("No", False),
        ("No, they are the same? no", False),
        ("They are not the same person.", False),
        ("It isn't the same speaker", False),
        ("Two different speakers.", False),
        ("I hear a dog barking", None),
        ("", None),
        (True, True),
        (0, False),
    ],
)
def test_parse_yes_no(answer, expected):
    assert metrics.parse_yes_no(answer) is expected


def test_verification_accuracy():
    out = metrics.verification_accuracy(["yes", "no", "yes", "no"], ["Yes.", "not the same", "music", "Yes"])
    assert (out["correct"], out["unparsed"]) == (2, 1) and out["accuracy"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="reference #0"):
        metrics.verification_accuracy(["maybe"], ["yes"])


# ---------------------------------------------------------------------------------------------------- following


SF_RECORDS = [
    {"id": "1", "reference": "seven am", "hypothesis": "Seven AM."},
    {"id": "2", "reference": "seven am", "hypothesis": "  "},
    {
        "id": "3",
        "reference": "seven am",
        "hypothesis": "Wake me up at seven am tomorrow.",
        "transcript": "wake me up at seven am tomorrow",
    },
    {"id": "4", "reference": "seven am", "hypothesis": "eight pm", "transcript": "wake me up at seven am tomorrow"},
]


def test_following_rate_and_accuracy_string_match():
    out = score_task(TASKS["sf"], SF_RECORDS)
    # 1 follows+correct; 2 empty; 3 only transcribes the speech (contains the answer, still not following); 4 wrong
    assert out["metrics"] == {"accuracy": pytest.approx(25.0), "following_rate": pytest.approx(50.0)}
    assert out["details"]["accuracy"]["followed"] == 2


def test_keyword_reference_list_and_custom_judge():
    ke = score_task(
        TASKS["ke"],
        [
            {
                "id": "1",
                "reference": "neural networks, speech recognition",
                "hypothesis": "Speech recognition and deep learning.",
            },
            {"id": "2", "reference": "audio; music", "hypothesis": "sport"},
        ],
    )
    assert ke["metrics"] == {"accuracy": pytest.approx(50.0), "following_rate": pytest.approx(100.0)}
    seen = []

    def judge(task, record):
        seen.append((task, record["id"]))
        return {"follows": True, "correct": record["id"] == "2"}

    out = score_task(TASKS["sf"], SF_RECORDS, judge=judge)
    assert out["metrics"] == {"accuracy": pytest.approx(25.0), "following_rate": pytest.approx(100.0)}
    assert seen == [("sf", "1"), ("sf", "2"), ("sf", "3"), ("sf", "4")]
    with pytest.raises(ValueError, match="judge returned"):
        score_task(TASKS["sf"], SF_RECORDS, judge=lambda task, record: True)


def test_story_following_rate_and_diversity():
    stories = [
        " ".join(f"word{i}" for i in range(50)),  # 50 words, 50 distinct: follows
        " ".join(["the"] * 49),  # 49 words: under 50, does not follow; 1 distinct
        " ".join(f"w{i % 30}" for i in range(60)),  # 60 words, 30 distinct: follows
    ]
    out = metrics.story_metrics(stories)
    assert out["following_rate"] == pytest.approx(100 * 2 / 3)
    assert out["diversity"] == pytest.approx((50 + 1 + 30) / 3)
    assert TASKS["story"].generation_overrides["max_new_tokens"] == 200


# ---------------------------------------------------------------------------------------------------- tasks


def test_task_table():
    paper_tasks = {
        "asr",
        "en2zh",
        "aac",
        "pr",
        "er",
        "mc",
        "osr",
        "sv",
        "en2de",
        "en2ja",
        "ke",
        "sqqa",
        "sf",
        "story",
        "sac",
    }
    assert set(PAPER_TABLE3) == paper_tasks  # the paper's 15 tasks
    assert paper_tasks < set(TASKS)
    for task, rows in PAPER_TABLE3.items():
        for values in rows.values():
            assert set(values) <= set(TASKS[task].metrics), task
            # Every number is filled in, in this harness's units: the paper's fractions are percent here.
            assert all(isinstance(v, float) for v in values.values()), task
            assert all(1.0 < values[m] <= 100.0 for m in ("accuracy", "following_rate") if m in values), task
    assert PAPER_TABLE3["asr"]["LibriSpeech test-clean"]["wer"] == 2.1
    assert get_task("translation_ec").name == "en2zh" and get_task("speech_separation").name == "osr"
    with pytest.raises(ValueError, match="not a known task"):
        get_task("dance")


# -------------------------------------------------------------------------------------------- manifests, prompts


def test_manifest_formats(tmp_path):
    ann = {
        "annotation": [
            {"path": "a.wav", "text": "hello", "task": "asr"},
            {"path": "b.wav", "text": "你好", "task": "translation_ec"},
            {"path": "/abs/c.wav", "text": "world", "task": "asr"},
            {"path": "a.wav", "text": "hello again", "task": "asr"},
        ]
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    items = load_manifest(tmp_path / "ann.json", get_task("asr"))
    assert [i["id"] for i in items] == ["a.wav", "/abs/c.wav", "a.wav#2"]
    assert items[0]["audio"] == str(tmp_path / "a.wav") and items[1]["audio"] == "/abs/c.wav"
    assert [i["reference"] for i in items] == ["hello", "world", "hello again"]

    (tmp_path / "m.csv").write_text("id,audio,reference\nu1,x.flac,one\nu2,y.flac,two\n")
    assert [(i["id"], i["reference"]) for i in load_manifest(tmp_path / "m.csv", get_task("asr"))] == [
        ("u1", "one"),
        ("u2", "two"),
    ]

    caps = _write_jsonl(
        tmp_path / "caps.jsonl",
        [
            {"audio": "k.wav", "reference": "a dog"},
            {"audio": "k.wav", "reference": "a dog barks"},
            {"audio": "l.wav", "reference": ["rain", "rainfall"]},
        ],
    )
    merged = load_manifest(caps, get_task("aac"))
    assert [i["reference"] for i in merged] == [["a dog", "a dog barks"], ["rain", "rainfall"]]

    _write_jsonl(tmp_path / "bad.jsonl", [{"reference": "x"}])
    with pytest.raises(ValueError, match="bad.jsonl: item 0 has no 'audio'"):
        load_manifest(tmp_path / "bad.jsonl", get_task("asr"))
    _write_jsonl(
        tmp_path / "dup.jsonl", [{"id": "1", "audio": "a", "text": "x"}, {"id": "1", "audio": "b", "text": "y"}]
    )
    with pytest.raises(ValueError, match="id '1' occurs more than once"):
        load_manifest(tmp_path / "dup.jsonl", get_task("asr"))
    _write_jsonl(tmp_path / "noq.jsonl", [{"audio": "a", "text": "x"}])
    with pytest.raises(ValueError, match="needs a question 'Q'"):
        load_manifest(tmp_path / "noq.jsonl", get_task("sf"))


def test_prompt_file_override():
    spec = get_task("sf")
    item = {"id": "1", "Q": "alarm time", "task": None}
    assert build_prompt(spec, item) == "From what the speaker says, what is the alarm time? Reply with the value only."
    prompts = {"slot_filling": "<Speech><SpeechHere></Speech> Which {} is mentioned?", "asr": "x"}
    assert build_prompt(spec, item, prompts) == "Which alarm time is mentioned?"
    # the item's own task key wins, as in the original runner
    assert build_prompt(get_task("asr"), {"id": "2", "task": "asr"}, {"asr": "Transcribe it."}) == "Transcribe it."
    assert build_prompt(spec, item, prompts, prompt_override="Just say it.") == "Just say it."
    with pytest.raises(ValueError, match="no prompt for task 'en2de'"):
        build_prompt(get_task("en2de"), item, prompts)


def test_expand_wav_is_joined_with_the_original_silence(tmp_path):
    sf = pytest.importorskip("soundfile")
    a = np.full(16000, 0.25)
    b = np.stack([np.full(8000, 0.5), np.zeros(8000)], axis=1)  # 1 s stereo at 8 kHz
    sf.write(tmp_path / "a.wav", a, 16000, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", b, 8000, subtype="FLOAT")
    joined = _load_joined_audio({"audio": str(tmp_path / "a.wav"), "expand_wav": [str(tmp_path / "b.wav")]})
    assert joined.shape == (16000 + 1600 + 16000,)
    assert np.allclose(joined[:16000], 0.25) and np.all(joined[16000 : 16000 + 1600] == 0)
    assert np.allclose(joined[-12000:-4000], 0.5, atol=1e-3)  # channel 0, resampled (edges ring a little)


# ---------------------------------------------------------------------------------------------------- CLI


def test_predictions_path_end_to_end(tmp_path, capsys):
    pred = _write_jsonl(
        tmp_path / "pred.jsonl",
        [
            {"id": str(i), "prompt": "p", "reference": r, "hypothesis": h}
            for i, (r, h) in enumerate(zip(ASR_REFS, ASR_HYPS))
        ]
        + [{"id": "3", "prompt": "p", "reference": "lost", "hypothesis": None, "error": "unreadable"}],
    )
    out = tmp_path / "res"
    assert main(["--task", "asr", "--predictions", str(pred), "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["wer"] == pytest.approx(100 * 2 / 12)
    assert (results["num_items"], results["num_scored"], results["num_failed"]) == (4, 3, 1)
    assert results["paper"]["LibriSpeech test-other"] == {"wer": 4.9}
    md = (out / "results.md").read_text()
    assert "| %WER | 16.67 | 2.10 | 4.90 | 10.00 |" in md
    assert md in capsys.readouterr().out
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--task", "nonsense", "--predictions", str(tmp_path / "p.jsonl")])
    assert exc.value.code == 2 and "not a known task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task", "asr", "--data", "x.jsonl"])
    assert "--model_name_or_path, --output_dir required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task", "asr", "--predictions", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl not found" in capsys.readouterr().err


def test_compare(tmp_path, capsys):
    for name, hyps in (("a", ASR_HYPS), ("b", ASR_REFS)):
        pred = _write_jsonl(
            tmp_path / f"{name}.jsonl",
            [
                {"id": str(i), "prompt": "p", "reference": r, "hypothesis": h}
                for i, (r, h) in enumerate(zip(ASR_REFS, hyps))
            ],
        )
        main(["--task", "asr", "--predictions", str(pred), "--output", str(tmp_path / name)])
    capsys.readouterr()
    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b" / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "| %WER | 16.67 | 0.00 | -16.67 |" in printed
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path / "a")])


def test_judge_and_dataset_flags(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_judge.py").write_text(
        "def judge(task, record):\n    return {'follows': True, 'correct': record['hypothesis'] == 'Paris'}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pred = _write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"id": "1", "prompt": "p", "reference": "paris", "hypothesis": "Paris"},
            {"id": "2", "prompt": "p", "reference": "rome", "hypothesis": ""},
        ],
    )
    main(["--task", "sqqa", "--predictions", str(pred), "--output", str(tmp_path / "r"), "--judge", "my_judge:judge"])
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["metrics"] == {"accuracy": pytest.approx(50.0), "following_rate": pytest.approx(100.0)}
    assert results["settings"]["judge"] == "my_judge:judge"
    with pytest.raises(SystemExit):
        main(["--task", "sqqa", "--predictions", str(pred), "--judge", "my_judge"])
    assert "expected module:callable" in capsys.readouterr().err

    main(["--task", "asr", "--predictions", str(pred), "--dataset", "LibriSpeech test-other"])
    assert "| Metric | Measured | Paper: LibriSpeech test-other |" in capsys.readouterr().out
    fake = FakeEngine({})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    with pytest.raises(SystemExit):  # a bad flag is refused before any model is loaded
        main(
            [
                "--model",
                "m",
                "--task",
                "asr",
                "--data",
                str(_asr_manifest(tmp_path)),
                "--output",
                str(tmp_path / "o"),
                "--dataset",
                "TIMIT",
            ]
        )
    assert "LibriSpeech test-clean" in capsys.readouterr().err and fake.loaded == []


# ------------------------------------------------------------------------------------ model runs (fake engine)


class FakeEngine:
    """Stands in for inference/engine.py: answers from a table, records what it was asked."""

    def __init__(self, answers: dict[str, str], fail_after: int | None = None):
        self.answers, self.fail_after = answers, fail_after
        self.loaded, self.asked, self.generation_kwargs = [], [], []

    def module(self):
        mod = types.ModuleType("salmonn.inference.engine")
        mod.load_model_and_processor = self.load_model_and_processor
        mod.run_items = self.run_items
        mod.stream_answer = self.stream_answer
        return mod

    def stream_answer(self, model, processor, item, generation_kwargs=None):
        self.generation_kwargs.append(generation_kwargs)
        self.asked.append((item["id"], item["prompt"]))
        answer = self.answers[item["id"]]
        yield from (answer[:3], answer[3:])

    def load_model_and_processor(self, name, **kwargs):
        self.loaded.append((name, kwargs))
        self.processor = types.SimpleNamespace(feature_extractor=types.SimpleNamespace(max_audio_seconds=600.0))
        return object(), self.processor

    def run_items(
        self, model, processor, items, batch_size=8, generation_kwargs=None, done_ids=frozenset(), progress=True
    ):
        self.generation_kwargs.append(generation_kwargs)
        for n, item in enumerate(i for i in items if i["id"] not in done_ids):
            if self.fail_after is not None and n == self.fail_after:
                raise RuntimeError("interrupted")
            self.asked.append((item["id"], item["prompt"]))
            if str(item["audio"]).endswith("missing"):
                yield {"id": item["id"], "audio": item["audio"], "prompt": item["prompt"], "error": "no such file"}
            else:
                yield {
                    "id": item["id"],
                    "audio": item["audio"],
                    "prompt": item["prompt"],
                    "answer": self.answers[item["id"]],
                    "seconds": 0.1,
                }


def _asr_manifest(tmp_path: Path) -> Path:
    return _write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"id": "u0", "audio": "u0.wav", "reference": ASR_REFS[0]},
            {"id": "u1", "audio": "u1.wav", "reference": ASR_REFS[1]},
            {"id": "u2", "audio": "u2.wav", "reference": ASR_REFS[2]},
        ],
    )


def test_model_run_prompts_and_prompt_file(tmp_path, monkeypatch):
    fake = FakeEngine({f"u{i}": h for i, h in enumerate(ASR_HYPS)})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    data, out = _asr_manifest(tmp_path), tmp_path / "out"
    assert main(["--model", "m", "--task", "asr", "--data", str(data), "--output", str(out), "--no_progress"]) == 0
    assert [p for _, p in fake.asked] == [TASKS["asr"].prompt] * 3
    assert fake.generation_kwargs == [None]  # the model's own generation config (beam 4, 200 tokens)
    assert fake.loaded[0][0] == "m"
    records = read_predictions(out / "predictions.jsonl")
    assert [set(r) >= {"id", "prompt", "reference", "hypothesis"} for r in records] == [True] * 3
    assert json.loads((out / "results.json").read_text())["metrics"]["wer"] == pytest.approx(100 * 2 / 12)

    prompt_file = tmp_path / "test_prompt.json"
    prompt_file.write_text(json.dumps({"asr": "<Speech><SpeechHere></Speech> Please transcribe this."}))
    fake.asked.clear()
    main(
        [
            "--model",
            "m",
            "--task",
            "asr",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out2"),
            "--prompt_file",
            str(prompt_file),
            "--num_beams",
            "1",
            "--no_progress",
        ]
    )
    assert [p for _, p in fake.asked] == ["Please transcribe this."] * 3
    assert fake.generation_kwargs[-1] == {"num_beams": 1}


def test_resumption(tmp_path, monkeypatch):
    data, out = _asr_manifest(tmp_path), tmp_path / "out"
    args = ["--model", "m", "--task", "asr", "--data", str(data), "--output", str(out), "--no_progress"]
    answers = {f"u{i}": h for i, h in enumerate(ASR_HYPS)}
    first = FakeEngine(answers, fail_after=2)
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", first.module())
    with pytest.raises(RuntimeError, match="interrupted"):
        main(args)
    assert [r["id"] for r in read_predictions(out / "predictions.jsonl")] == ["u0", "u1"]
    assert not (out / "results.json").exists()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "u2", "prompt": "Write do')  # killed in the middle of a write

    second = FakeEngine(answers)
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", second.module())
    assert main(args) == 0
    assert [i for i, _ in second.asked] == ["u2"]
    assert [r["id"] for r in read_predictions(out / "predictions.jsonl")] == ["u0", "u1", "u2"]
    assert json.loads((out / "results.json").read_text())["metrics"]["wer"] == pytest.approx(100 * 2 / 12)

    third = FakeEngine(answers)  # everything answered: no model is even loaded
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", third.module())
    assert main(args) == 0 and third.loaded == []

    with pytest.raises(SystemExit):  # a different prompt would mix two settings in one folder
        main(args + ["--prompt", "Transcribe."])
    with pytest.raises(SystemExit):  # so would other decoding settings
        main(args + ["--num_beams", "2"])
    assert main(args + ["--prompt", "Transcribe.", "--overwrite"]) == 0
    assert [p for _, p in third.asked] == ["Transcribe."] * 3


def test_failed_audio_is_recorded_and_retried(tmp_path, monkeypatch):
    data = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "a", "audio": "ok.wav", "reference": "yes"}, {"id": "b", "audio": "missing", "reference": "no"}],
    )
    fake = FakeEngine({"a": "Yes.", "b": "No."})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    out = tmp_path / "sv"
    main(["--model", "m", "--task", "sv", "--data", str(data), "--output", str(out), "--no_progress"])
    results = json.loads((out / "results.json").read_text())
    assert (results["num_scored"], results["num_failed"], results["failed_ids"]) == (1, 1, ["b"])
    assert results["metrics"]["accuracy"] == pytest.approx(100.0)
    fake.asked.clear()
    main(["--model", "m", "--task", "sv", "--data", str(data), "--output", str(out), "--no_progress"])
    assert [i for i, _ in fake.asked] == ["b"]  # only the failed item is tried again


# ---------------------------------------------------------------------------------------------------- tiny model


def test_end_to_end_on_a_tiny_checkpoint(tiny, tmp_path, monkeypatch):
    """salmonn-eval through the real engine on a saved tiny model: the answers it records are the ones
    `generate_answers` gives for the same prompt and audio (joined `expand_wav` included), and a rerun resumes."""
    sf = pytest.importorskip("soundfile")
    from salmonn.inference import engine

    ckpt = tmp_path / "ckpt"
    for part in tiny:  # the session's tiny model and processor, saved as a checkpoint folder
        part.save_pretrained(ckpt)
    t = np.arange(16000) / 16000
    for name, freq in (("a", 220.0), ("b", 660.0)):
        sf.write(tmp_path / f"{name}.wav", 0.3 * np.sin(2 * np.pi * freq * t), 16000)
    data = _write_jsonl(
        tmp_path / "sv.jsonl",
        [
            {"id": "same", "audio": "a.wav", "reference": "yes"},
            {"id": "pair", "audio": "a.wav", "expand_wav": ["b.wav"], "reference": "no"},
        ],
    )
    out = tmp_path / "out"
    args = [
        "--model",
        str(ckpt),
        "--task",
        "sv",
        "--data",
        str(data),
        "--output",
        str(out),
        "--num_beams",
        "1",
        "--max_new_tokens",
        "6",
        "--batch_size",
        "2",
        "--no_progress",
    ]
    assert main(args) == 0
    records = {r["id"]: r for r in read_predictions(out / "predictions.jsonl")}
    assert set(records) == {"same", "pair"} and all(isinstance(r["hypothesis"], str) for r in records.values())

    model, processor = engine.load_model_and_processor(str(ckpt))
    joined = _load_joined_audio({"audio": str(tmp_path / "a.wav"), "expand_wav": [str(tmp_path / "b.wav")]})
    expected = [
        engine.generate_answers(model, processor, [item], {"num_beams": 1, "max_new_tokens": 6})[0]
        for item in (
            {"audio": str(tmp_path / "a.wav"), "prompt": TASKS["sv"].prompt},
            {"audio": joined, "sampling_rate": 16000, "prompt": TASKS["sv"].prompt},
        )
    ]
    assert [records["same"]["hypothesis"], records["pair"]["hypothesis"]] == expected
    results = json.loads((out / "results.json").read_text())
    assert results["num_scored"] == 2 and results["metrics"]["accuracy"] is not None

    calls = []
    monkeypatch.setattr(engine, "load_model_and_processor", lambda *a, **k: calls.append(a))
    assert main(args) == 0 and calls == []  # all answered: nothing reloaded


def test_model_run_reads_a_datasets_dataset(tmp_path, monkeypatch):
    import datasets

    import soundfile

    rate, paths = 16000, []
    for k, frequency in enumerate((300.0, 500.0, 700.0)):
        paths.append(str(tmp_path / f"u{k}.wav"))
        soundfile.write(paths[-1], 0.3 * np.sin(2 * np.pi * frequency * np.arange(rate) / rate), rate)
    dataset = datasets.Dataset.from_dict({"audio": paths, "sentence": ASR_REFS}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "ds"))
    name = str(tmp_path / "ds")
    fake = FakeEngine({f"{name}[test]:{i}": h for i, h in enumerate(ASR_HYPS)})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    out = tmp_path / "out"
    argv = ["--model", "m", "--task", "asr", "--dataset_name", name, "--text_column", "sentence", "--output", str(out)]
    assert main(argv + ["--no_progress"]) == 0
    assert [item_id for item_id, _ in fake.asked] == [f"{name}[test]:{i}" for i in range(3)]
    records = read_predictions(out / "predictions.jsonl")
    assert [r["reference"] for r in records] == ASR_REFS and [r["hypothesis"] for r in records] == ASR_HYPS
    assert json.loads((out / "results.json").read_text())["metrics"]["wer"] == pytest.approx(100 * 2 / 12)
    with pytest.raises(SystemExit):
        main(["--model", "m", "--task", "asr", "--dataset_name", name, "--output", str(tmp_path / "o2")])  # no 'text' column


def test_resume_refuses_answers_made_for_another_manifest(tmp_path, monkeypatch, capsys):
    """Same file names and ids, other folder and references: the answers of the first manifest are not reused."""
    answers = {f"u{i}": h for i, h in enumerate(ASR_HYPS)}
    out = tmp_path / "out"
    first_dir, second_dir = tmp_path / "set1", tmp_path / "set2"
    first_dir.mkdir()
    second_dir.mkdir()
    first = _asr_manifest(first_dir)
    second = _write_jsonl(
        second_dir / "test.jsonl", [{"id": f"u{i}", "audio": f"u{i}.wav", "text": f"other words {i}"} for i in range(3)]
    )
    fake = FakeEngine(answers)
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    argv = ["--model_name_or_path", "m", "--task", "asr", "--output_dir", str(out), "--disable_tqdm"]
    assert main([*argv, "--test_file", str(first)]) == 0
    predictions = (out / "predictions.jsonl").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--test_file", str(second)])
    assert exit_info.value.code == 2
    assert "item 'u0' was answered for other data" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == predictions and len(fake.asked) == 3
    assert main([*argv, "--test_file", str(second), "--overwrite_output_dir"]) == 0
    assert [r["reference"] for r in read_predictions(out / "predictions.jsonl")] == [f"other words {i}" for i in range(3)]


def test_resume_answers_again_an_audio_file_replaced_under_the_same_name(tmp_path, monkeypatch, caplog):
    """QA issue 19: the answer to a replaced file was kept (the record named the path only); it is answered again."""
    data, out = _asr_manifest(tmp_path), tmp_path / "out"
    for i in range(3):
        (tmp_path / f"u{i}.wav").write_bytes(b"RIFF" + bytes([i]) * 64)
    args = ["--model", "m", "--task", "asr", "--data", str(data), "--output", str(out), "--no_progress"]
    fake = FakeEngine({f"u{i}": h for i, h in enumerate(ASR_HYPS)})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    assert main(args) == 0
    first = read_predictions(out / "predictions.jsonl")
    assert [r["audio_hash"] for r in first] == [audio_hash([str(tmp_path / f"u{i}.wav")]) for i in range(3)]
    assert main(args) == 0 and len(fake.asked) == 3  # unchanged: nothing answered again

    (tmp_path / "u2.wav").write_bytes(b"RIFF" + b"\x09" * 64)  # same name and size, other content
    fake.answers["u2"] = ASR_REFS[2]
    caplog.clear()
    assert main(args) == 0
    assert [i for i, _ in fake.asked[3:]] == ["u2"]
    assert "1 answered items have other audio content now (the file was replaced)" in caplog.text
    latest = latest_by_id(read_predictions(out / "predictions.jsonl"))
    assert latest["u2"]["hypothesis"] == ASR_REFS[2] and latest["u2"]["audio_hash"] != first[2]["audio_hash"]
    # The new answer is scored, not the old one (whose two errors gave a WER of 2/12).
    assert json.loads((out / "results.json").read_text())["metrics"]["wer"] == pytest.approx(0.0)

    # Records of earlier versions carry no hash: they are kept as they were kept then.
    lines = [{k: v for k, v in r.items() if k != "audio_hash"} for r in read_predictions(out / "predictions.jsonl")]
    _write_jsonl(out / "predictions.jsonl", lines)
    (tmp_path / "u1.wav").write_bytes(b"RIFF" + b"\x08" * 64)
    assert main(args) == 0 and len(fake.asked) == 4


def test_sampling_flags_and_item_prompts_reach_the_engine(tmp_path, monkeypatch):
    fake = FakeEngine({"a": "one", "b": "two"})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    data = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "a", "audio": "a.wav", "text": "one", "prompt": "Write it down."}, {"id": "b", "path": "b.wav", "reference": "two"}],
    )
    out = tmp_path / "out"
    argv = ["--model", "m", "--task", "asr", "--data", str(data), "--output", str(out), "--no_progress", "--do_sample",
            "--temperature", "0.7", "--top_p", "0.9", "--seed", "5", "--max_audio_seconds", "30"]
    assert main(argv) == 0
    assert fake.generation_kwargs == [{"do_sample": True, "temperature": 0.7, "top_p": 0.9}]
    assert fake.asked == [("a", "Write it down."), ("b", TASKS["asr"].prompt)]
    assert fake.processor.feature_extractor.max_audio_seconds == 30.0
    config = json.loads((out / "run_config.json").read_text())
    assert config["seed"] == 5 and config["engine"] == "transformers"
    with pytest.raises(SystemExit):  # another seed samples other answers: not mixed in
        main([*argv[:-4], "--seed", "6"])


def test_stream_prints_each_answer_as_it_comes(tmp_path, monkeypatch, capsys):
    fake = FakeEngine({f"u{i}": h for i, h in enumerate(ASR_HYPS)})
    monkeypatch.setitem(sys.modules, "salmonn.inference.engine", fake.module())
    out = tmp_path / "out"
    argv = ["--model", "m", "--task", "asr", "--test_file", str(_asr_manifest(tmp_path)), "--output_dir", str(out), "--stream"]
    assert main(argv) == 0
    assert capsys.readouterr().err.splitlines()[-3:] == ASR_HYPS
    assert fake.generation_kwargs == [{"num_beams": 1}] * 3
    assert [r["hypothesis"] for r in read_predictions(out / "predictions.jsonl")] == ASR_HYPS
    with pytest.raises(SystemExit):
        main([*argv, "--num_beams", "2", "--overwrite_output_dir"])
