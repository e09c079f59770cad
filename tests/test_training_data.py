"""Training data: prompt pools, manifests, datasets, bad items, synthetic audio and the collator."""

from __future__ import annotations

import json
from pathlib import Path
import logging

import numpy as np
import pytest
import soundfile

from tests.utils import FIXTURE_A
from salmonn.audio import join_with_silence, read_audio
from salmonn.training.collator import SalmonnDataCollator
from salmonn.training.data import HFDatasetItems, SalmonnTrainDataset, load_manifest
from salmonn.training.prompts import DEFAULT_PROMPTS, PromptPool, fill_prompt, load_prompt_file
from salmonn.training.synthetic import SOUND_CLASSES, espeak_available, make_clip, write_dataset


AUDIO = FIXTURE_A / "audio"
PAPER_TASKS = [
    "asr", "translation_ec", "audiocaption", "QA", "emotion_recognition", "gender_recognition", "phone_recognition",
    "music_description", "speech_separation", "speaker_verification", "audio_story_telling",
]


def _wav(path, seconds=1.0, rate=16000, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    data = 0.1 * rng.standard_normal((int(seconds * rate), channels) if channels > 1 else int(seconds * rate))
    soundfile.write(path, data, rate)
    return path


# -- prompts ---------------------------------------------------------------------------------------------------


def test_default_pools_cover_the_paper_tasks_and_are_valid():
    pool = PromptPool()
    for task in PAPER_TASKS:
        assert task in pool and pool.pools[task], task
    for task, prompts in DEFAULT_PROMPTS.items():
        for prompt in prompts:
            assert prompt.count("<SpeechHere>") == 1 and prompt.startswith("<Speech><SpeechHere></Speech> "), (task, prompt)
    assert pool.needs_question("QA") and not pool.needs_question("asr")
    assert pool.resolve_task("translation") == "translation_ec"


def test_prompt_choice_is_deterministic_and_fills_the_question():
    pool = PromptPool()
    picks = {pool.choose("asr", seed=f"42:0:{i}") for i in range(40)}
    assert len(picks) > 1  # the pool is used, not one prompt
    assert pool.choose("asr", seed="42:0:7") == pool.choose("asr", seed="42:0:7")
    assert pool.choose("QA", "What animal is it?", seed=1) == "<Speech><SpeechHere></Speech> What animal is it?"
    assert fill_prompt("<SpeechHere> {} {x}", "Q?") == "<SpeechHere> Q? {x}"


def test_prompt_file_overrides_and_errors(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"audiocaption": ["<Speech><SpeechHere></Speech> Only this."], "new_task": "<SpeechHere> x"}))
    pool = PromptPool(prompt_file=good)
    assert pool.pools["audiocaption"] == ["<Speech><SpeechHere></Speech> Only this."]
    assert "new_task" in pool and "asr" in pool  # other tasks keep the built-in pools
    assert load_prompt_file(FIXTURE_A / "prompts.json") == json.loads((FIXTURE_A / "prompts.json").read_text())

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"asr": ["Transcribe.", "<SpeechHere> fine"]}))
    with pytest.raises(ValueError, match=r"task 'asr', prompt 0.*0 <SpeechHere>"):
        PromptPool(prompt_file=bad)
    with pytest.raises(ValueError, match="does not exist"):
        PromptPool(prompt_file=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="Unknown task 'karaoke'"):
        PromptPool().choose("karaoke")


# -- manifests -----------------------------------------------------------------------------------------------


def test_original_annotation_file_loads_with_paths_next_to_it():
    items = load_manifest(FIXTURE_A / "annotations.json")
    # resolved on both sides: the checkout may be reached through a symbolic link
    assert [Path(it["path"]).resolve() for it in items] == [(AUDIO / name).resolve() for name in ("gunshots.wav", "synth_short.wav")]
    assert items[0]["text"] == "Gunshots echo across an open field." and items[0]["task"] == "audiocaption"
    assert items[1]["Q"] == "" and items[1]["expand_wav"] == [] and items[0]["id"] == items[0]["path"]


def test_jsonl_csv_and_json_list_give_the_same_items(tmp_path):
    rows = [
        {"path": str(AUDIO / "music.wav"), "text": "A tune.", "task": "music_description"},
        {"path": str(AUDIO / "duck.wav"), "text": "yes", "task": "QA", "Q": "Is it a duck?", "expand_wav": [str(AUDIO / "music.wav")]},
        {"path": str(AUDIO / "gunshots.wav"), "text": "bang"},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with open(tmp_path / "c.csv", "w") as handle:
        handle.write("path,text,task,Q,expand_wav\n")
        for r in rows:
            handle.write(f"{r['path']},{r['text']},{r.get('task', '')},{r.get('Q', '')},{';'.join(r.get('expand_wav', []))}\n")
    loaded = [load_manifest(tmp_path / name) for name in ("a.jsonl", "b.json", "c.csv")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][2]["task"] == "asr"  # the original's default task
    assert loaded[0][1]["expand_wav"] == [str(AUDIO / "music.wav")] and loaded[0][1]["Q"] == "Is it a duck?"
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_manifest(tmp_path / "d.txt")
    (tmp_path / "e.json").write_text(json.dumps({"items": []}))
    with pytest.raises(ValueError, match="annotation"):
        load_manifest(tmp_path / "e.json")


def test_expand_wav_joins_with_a_tenth_of_a_second_of_silence_and_keeps_channel_0():
    duck, rate = read_audio(AUDIO / "duck.wav")  # stereo -> channel 0
    raw, _ = soundfile.read(AUDIO / "duck.wav", dtype="float64")
    np.testing.assert_array_equal(duck, raw[:, 0])
    music, _ = read_audio(AUDIO / "music.wav")
    joined, joined_rate = join_with_silence([(duck, rate), (music, rate)])
    assert joined_rate == 16000 and len(joined) == len(duck) + 1600 + len(music)
    np.testing.assert_array_equal(joined[: len(duck)], duck)
    assert not joined[len(duck) : len(duck) + 1600].any()
    np.testing.assert_array_equal(joined[len(duck) + 1600 :], music)
    # Different rates meet at 16 kHz.
    mixed, mixed_rate = join_with_silence([(np.ones(8000), 8000), (np.ones(16000), 16000)])
    assert mixed_rate == 16000 and abs(len(mixed) - (16000 + 1600 + 16000)) <= 2


def test_bad_items_are_skipped_with_a_counting_warning_or_raise_when_strict(tmp_path, caplog):
    good = _wav(tmp_path / "good.wav")
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    rows = [
        {"path": str(good), "text": "fine"},
        {"path": str(tmp_path / "missing.wav"), "text": "x"},
        {"path": str(tmp_path / "other_missing.flac"), "text": "x"},
        {"path": str(tmp_path / "broken.wav"), "text": "x"},
        {"path": str(good), "text": "   "},
        {"path": str(good), "text": "yes", "task": "QA"},
        {"path": str(good), "text": "two", "expand_wav": [str(tmp_path / "gone.wav")]},
    ]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"annotation": rows}))
    items = load_manifest(manifest)
    with caplog.at_level(logging.WARNING, logger="salmonn.training.data"):
        dataset = SalmonnTrainDataset(items, PromptPool(), name="m.json")
    assert len(dataset) == 1 and dataset[0]["answer"] == "fine"
    message = caplog.text
    assert "skipped 6 of 7 items" in message
    assert "3 x missing audio file" in message and "missing.wav" in message
    assert "1 x unreadable audio file" in message and "broken.wav" in message
    assert "1 x empty answer" in message and "no question" in message

    with pytest.raises(ValueError, match=r"m.json: item 1 .*missing audio file .*missing.wav"):
        SalmonnTrainDataset(items, PromptPool(), name="m.json", strict=True)

    unknown = load_manifest(manifest)[:1]
    unknown[0]["task"] = "karaoke"
    with pytest.raises(ValueError, match=r"no prompt for task\(s\) \{'karaoke': 1\}.*--prompt_file"):
        SalmonnTrainDataset(unknown, PromptPool(), name="m.json")
    with pytest.raises(ValueError, match="none of its 2 items is usable"):
        SalmonnTrainDataset(items[1:3], PromptPool(), name="m.json")


def test_audio_that_fails_at_load_time_is_replaced_by_the_next_item(tmp_path, tiny, caplog, monkeypatch):
    """One corrupt body never ends a run: at batch size 1 the batch is the next item, with a warning naming both."""
    import salmonn.training.data as data

    _, processor = tiny
    paths = [_wav(tmp_path / f"{k}.wav", seed=k) for k in range(4)]
    items = load_manifest(_manifest(tmp_path, [{"audio": str(p), "text": f"t{k}"} for k, p in enumerate(paths)]))
    dataset = SalmonnTrainDataset(items, PromptPool())
    paths[1].write_bytes(b"corrupted after the check")
    with caplog.at_level(logging.WARNING):
        example = dataset[1]
    assert example["id"] == str(paths[2]) and example["answer"] == "t2"
    np.testing.assert_array_equal(example["audio"], read_audio(paths[2])[0])
    assert f"train: item 1 skipped at load time: {paths[1]}: cannot decode audio file" in caplog.text
    assert f"item 2 ({str(paths[2])!r}) is used in its place" in caplog.text
    batch = SalmonnDataCollator(processor)([example])
    assert batch["ids"] == [str(paths[2])] and batch["input_ids"].shape[0] == 1

    paths[3].write_bytes(b"also corrupted")  # the last item wraps around to the first
    assert dataset[3]["id"] == str(paths[0])
    paths[0].write_bytes(b"corrupted too")
    assert dataset[3]["id"] == str(paths[2])  # 3, 0 and 1 fail: three in a row are still within the bound
    monkeypatch.setattr(data, "MAX_FAILED_LOADS_IN_A_ROW", 2)
    with pytest.raises(ValueError, match=rf"train: 2 items in a row from item 3 failed to load their audio \(first: item 3 skipped"):
        dataset[3]
    strict = SalmonnTrainDataset(items, PromptPool(), strict=True, verify_audio=False)
    with pytest.raises(ValueError, match="train: item 1: .*cannot decode audio file"):
        strict[1]


def test_manifest_fields_are_those_of_infer_and_eval(tmp_path):
    """`audio`, `text`, `prompt`, `id` (the original's `path` too); an item's own prompt replaces its task's pool."""
    rows = [
        {"audio": str(AUDIO / "duck.wav"), "text": "a duck", "prompt": "What animal is this?", "id": "d1", "task": "no_such_task"},
        {"path": str(AUDIO / "music.wav"), "text": "A tune.", "prompt": "<SpeechHere> Describe the music."},
        {"audio": str(AUDIO / "gunshots.wav"), "text": "bang", "prompt": ""},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = SalmonnTrainDataset(load_manifest(manifest), PromptPool(), seed=0)
    first, second, third = dataset[0], dataset[1], dataset[2]
    assert first["id"] == "d1" and first["prompt"] == "<Speech><SpeechHere></Speech> What animal is this?"
    assert second["prompt"] == "<SpeechHere> Describe the music." and second["id"] == str(AUDIO / "music.wav")
    assert third["prompt"] == PromptPool().choose("asr", seed="0:0:2")  # no prompt: the task's pool
    (tmp_path / "two.jsonl").write_text(json.dumps({"audio": str(AUDIO / "duck.wav"), "text": "x", "prompt": "<SpeechHere><SpeechHere>"}))
    with pytest.raises(ValueError, match=r"two.jsonl item 0: the prompt .* has 2 <SpeechHere> markers"):
        load_manifest(tmp_path / "two.jsonl")


def _manifest(tmp_path, rows, name="m.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"annotation": rows}))
    return path


def test_dataset_prompts_depend_on_seed_epoch_and_index_only(tmp_path):
    a = _wav(tmp_path / "a.wav")
    items = load_manifest(_manifest(tmp_path, [{"path": str(a), "text": f"t{i}", "task": "asr"} for i in range(30)]))
    first = SalmonnTrainDataset(items, PromptPool(), seed=3)
    second = SalmonnTrainDataset(items, PromptPool(), seed=3)
    epoch0 = [first[i]["prompt"] for i in range(30)]
    assert epoch0 == [second[i]["prompt"] for i in range(30)]
    first.set_epoch(1)
    assert epoch0 != [first[i]["prompt"] for i in range(30)]
    example = second[4]
    assert set(example) == {"id", "audio", "sampling_rate", "prompt", "answer", "task"}
    assert example["audio"].dtype == np.float64 and example["sampling_rate"] == 16000


def test_datasets_dataset_with_an_audio_column_decodes_with_soundfile(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"audio": [str(AUDIO / "gunshots.wav"), str(AUDIO / "duck.wav")], "text": ["bang", "quack"], "task": ["audiocaption", "audiocaption"]}
    ).cast_column("audio", datasets.Audio())
    items = HFDatasetItems(ds, name="toy")
    assert len(items) == 2
    item = items[1]
    assert item["path"].endswith("duck.wav") and item["text"] == "quack" and item["id"] == "toy:1"
    dataset = SalmonnTrainDataset(items, PromptPool(), name="toy")
    example = dataset[1]
    expected, _ = read_audio(AUDIO / "duck.wav")
    np.testing.assert_array_equal(example["audio"], expected)

    # Embedded bytes (a dataset saved with its audio), and plain arrays with a sampling_rate column.
    embedded = datasets.Dataset.from_dict(
        {"audio": [{"bytes": (AUDIO / "music.wav").read_bytes(), "path": None}], "text": ["tune"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    np.testing.assert_array_equal(SalmonnTrainDataset(HFDatasetItems(embedded), PromptPool())[0]["audio"], read_audio(AUDIO / "music.wav")[0])
    arrays = datasets.Dataset.from_dict({"audio": [[0.0, 0.5, -0.5] * 100], "sampling_rate": [8000], "text": ["x"]})
    example = SalmonnTrainDataset(HFDatasetItems(arrays), PromptPool())[0]
    assert example["sampling_rate"] == 8000 and example["audio"].shape == (300,)
    with pytest.raises(ValueError, match="no audio column 'sound'"):
        HFDatasetItems(arrays, audio_column="sound")
    prompted = datasets.Dataset.from_dict({"audio": [str(AUDIO / "duck.wav")], "text": ["quack"], "prompt": ["Which animal?"]})
    example = SalmonnTrainDataset(HFDatasetItems(prompted, prompt_column="prompt"), PromptPool())[0]
    assert example["prompt"] == "<Speech><SpeechHere></Speech> Which animal?"


# -- synthetic audio -----------------------------------------------------------------------------------------


def test_synthetic_clips_are_deterministic_and_distinct(tmp_path):
    for sound in [c for c in SOUND_CLASSES if c.kind != "speech"]:
        clip = make_clip(sound, seed=5)
        np.testing.assert_array_equal(clip, make_clip(sound.name, seed=5))
        assert clip.ndim == 1 and 0.5 * 16000 < len(clip) < 3.5 * 16000 and np.abs(clip).max() <= 1.0
        assert not np.array_equal(clip[:8000], make_clip(sound, seed=6)[:8000])
    tone_spectrum = np.abs(np.fft.rfft(make_clip("tone", 1)))
    noise_spectrum = np.abs(np.fft.rfft(make_clip("noise", 1)))
    # A tone concentrates its energy in one bin; noise spreads it.
    assert tone_spectrum.max() / tone_spectrum.mean() > 20 * noise_spectrum.max() / noise_spectrum.mean()
    manifest = write_dataset(tmp_path / "syn", 2, [c for c in SOUND_CLASSES if c.kind != "speech"], seed=1)
    items = load_manifest(manifest)
    assert len(items) == 6 and {it["text"] for it in items} == {c.answer for c in SOUND_CLASSES[:3]}
    assert soundfile.info(items[0]["path"]).samplerate == 16000


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_spoken_words_come_from_espeak():
    first, second = make_clip("speech", 0), make_clip("speech", 1)
    assert len(first) > 0.3 * 16000 and np.abs(first).max() > 0.1
    assert not np.array_equal(first[:4000], second[:4000])
    np.testing.assert_array_equal(first, make_clip("speech", 0))


# -- collator ------------------------------------------------------------------------------------------------


def test_collator_puts_loss_only_on_the_answer_and_eos(tiny):
    _, processor = tiny
    collator = SalmonnDataCollator(processor, max_txt_len=300)
    examples = [
        {"id": "a", "audio": make_clip("tone", 0), "sampling_rate": 16000, "prompt": "<Speech><SpeechHere></Speech> Describe the audio.", "answer": "A pure tone plays steadily."},
        {"id": "b", "audio": make_clip("noise", 0)[::2], "sampling_rate": 8000, "prompt": "<Speech><SpeechHere></Speech> What is this sound?", "answer": "White noise."},
    ]
    batch = collator(examples)
    assert batch["ids"] == ["a", "b"]
    tokenizer = processor.tokenizer
    for row, example in enumerate(examples):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert kept == tokenizer(example["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids[-len(kept):] == kept  # the answer ends the sequence; right padding
        prompt_text = tokenizer.decode([i for i in ids[: -len(kept)] if i != processor.audio_token_id], skip_special_tokens=True)
        instruction = example["prompt"].split("</Speech>")[1]
        assert prompt_text.replace(" ", "") == f"USER:<Speech></Speech>{instruction}\nASSISTANT:".replace(" ", "")
    assert (batch["input_ids"] == processor.audio_token_id).sum(-1).tolist() == [88, 88]

    short = SalmonnDataCollator(processor, max_txt_len=4)(examples[:1])
    kept = short["labels"][0][short["labels"][0] != -100].tolist()
    full = tokenizer(examples[0]["answer"], add_special_tokens=False)["input_ids"]
    assert kept == full[:3] + [tokenizer.eos_token_id]  # cut at the end of the answer, </s> kept
    # The prompt and the audio are untouched.
    prompt_length = int(batch["attention_mask"][0].sum()) - (len(full) + 1)
    assert short["input_ids"].shape[1] == prompt_length + 4
    assert short["input_ids"][0, :prompt_length].tolist() == batch["input_ids"][0, :prompt_length].tolist()


def test_collator_names_bad_examples(tiny):
    _, processor = tiny
    collator = SalmonnDataCollator(processor)
    base = {"id": "clip7", "audio": np.zeros(16000), "sampling_rate": 16000, "prompt": "<SpeechHere> Hi", "answer": "ok"}
    with pytest.raises(ValueError, match="clip7.*<SpeechHere>"):
        collator([{**base, "prompt": "Describe the audio."}])
    with pytest.raises(ValueError, match="clip7.*empty answer"):
        collator([{**base, "answer": ""}])
    with pytest.raises(ValueError, match="at least 2"):
        SalmonnDataCollator(processor, max_txt_len=1)
