"""Hostile and broken input at every entry point (issue #12): nothing lost, nothing silent.

Each test names the case of the issue it pins down. The inputs are made here, small; the assertions are the exact
behaviour: the file left byte-identical, the named error message, nothing saved, the run refused.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from tests.utils import tiny_model_and_processor


SR = 16000


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_model_and_processor()
    return model.eval(), processor


def _tone(seconds: float, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * 440 * t)


def _wav(path: Path, seconds: float, rate: int = SR, channels: int = 1) -> Path:
    audio = _tone(seconds, rate)
    soundfile.write(str(path), np.stack([audio] * channels, axis=1) if channels > 1 else audio, rate, subtype="PCM_16")
    return path


# -- salmonn-infer --output (cases 1, 2, 14) -------------------------------------------------------------------


def _infer(tmp_path, output, *extra):
    from salmonn.inference.infer import main

    clip = _wav(tmp_path / "clip.wav", 1.0)
    return main(["--model", str(tmp_path / "no-model"), "--output", str(output), "--no-progress", *extra, str(clip)])


@pytest.mark.parametrize(
    "content",
    [
        b"my notes\nsecond line without a final newline",
        b'{"id": "a", "audio": "a.wav", "prompt": "x"}\n{"id": "b", "audio": "b.wav"}\n',
        b'{"id": "a", "audio": "a.wav", "prompt": "x", "answer": "ok"}\n{"id": "b", "audio": "b.wav"}',
        b"\xff\xfe binary",
    ],
    ids=["notes", "manifest", "record-then-manifest-line", "binary"],
)
def test_case1_output_not_written_by_infer_is_refused_untouched(tmp_path, caplog, content):
    output = tmp_path / "notes.jsonl"
    output.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        assert _infer(tmp_path, output) == 2
    assert output.read_bytes() == content
    assert "left unchanged" in caplog.text and str(output) in caplog.text


def test_case1_only_a_cut_record_is_dropped_from_own_output(tmp_path):
    from salmonn.inference.output import read_done_ids

    output = tmp_path / "out.jsonl"
    output.write_bytes(b'{"id": "a", "audio": "a.wav", "prompt": "x", "answer": "ok", "seconds": 1.0}\n{"id": "b", "aud')
    assert read_done_ids(output) == {"a"}
    assert output.read_bytes() == b'{"id": "a", "audio": "a.wav", "prompt": "x", "answer": "ok", "seconds": 1.0}\n'


def test_case2_a_second_run_on_the_same_output_is_refused(tmp_path, caplog):
    from salmonn.inference.output import lock_output

    output = tmp_path / "out.jsonl"
    content = b'{"id": "a", "audio": "a.wav", "prompt": "x", "error": "bad"}\n'
    output.write_bytes(content)
    held = lock_output(output)  # the first run, still working
    try:
        with caplog.at_level(logging.ERROR):
            assert _infer(tmp_path, output) == 2
        assert "is in use by another salmonn-infer run" in caplog.text
        assert output.read_bytes() == content
    finally:
        held.close()
    caplog.clear()
    # Once the first run has ended, the lock is free again (the run then fails later, on the missing model).
    with caplog.at_level(logging.ERROR):
        assert _infer(tmp_path, output) == 2
    assert "in use" not in caplog.text and "Cannot load --model" in caplog.text
    assert output.read_bytes() == content


def test_case14_output_that_is_a_folder_is_a_clear_error(tmp_path, caplog):
    folder = tmp_path / "results"
    folder.mkdir()
    with caplog.at_level(logging.ERROR):
        assert _infer(tmp_path, folder) == 2
    assert f"--output {str(folder)!r} is a folder; give the path of a .jsonl file" in caplog.text
    assert list(folder.iterdir()) == []


# -- issue 19 (round 2): infer/eval outputs, records and resumption (items 4, 5, 6, 11) ---------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_r2_output_that_is_not_a_regular_file_is_refused_up_front(tmp_path, caplog, kind):
    output = tmp_path / "pipe.jsonl" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(output)  # opening it would wait forever for a reader
    with caplog.at_level(logging.ERROR):
        assert _infer(tmp_path, output) == 2
    assert f"--output {str(output)!r} is not a regular file (a pipe, device or socket)" in caplog.text


def test_r2_records_with_unicode_line_separators_read_back(tmp_path):
    from salmonn.evaluation.items import load_manifest
    from salmonn.evaluation.tasks import get_task
    from salmonn.inference.output import JsonlWriter, read_records

    output = tmp_path / "out.jsonl"
    writer = JsonlWriter(output)
    prompts = ["line\u2028separator", "next\x85line", "para\u2029graph"]
    for k, prompt in enumerate(prompts):
        writer.write({"id": str(k), "audio": "a.wav", "prompt": prompt, "answer": "ok"})
    writer.close()
    assert "\u2028" in output.read_text(encoding="utf-8")  # written as readable text, not escaped
    assert [r["prompt"] for r in read_records(output).values()] == prompts
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [i["reference"] for i in load_manifest(manifest, get_task("asr"))] == ["one\u2028two"]


def test_r2_an_id_that_is_not_utf8_is_written_escaped_and_later_items_go_on(tmp_path):
    from salmonn.inference.output import JsonlWriter, read_records

    output = tmp_path / "out.jsonl"
    writer = JsonlWriter(output)
    writer.write({"id": json.loads('"bad\\udc80id"'), "audio": "a.wav", "prompt": "p", "answer": "x"})
    writer.write({"id": "after", "audio": "b.wav", "prompt": "p\u00e9", "answer": "y"})
    writer.close()
    lines = output.read_bytes().split(b"\n")
    assert lines[0].startswith(b'{"id": "bad\\udc80id"') and lines[1].startswith('{"id": "after", "audio": "b.wav", "prompt": "p\u00e9"'.encode())
    assert list(read_records(output)) == ["bad\udc80id", "after"]


def test_r2_failed_items_are_retried_and_another_run_is_refused(tmp_path, caplog):
    from salmonn.inference.output import read_done_ids

    clip = _wav(tmp_path / "clip.wav", 1.0)
    output = tmp_path / "out.jsonl"
    run = {"model": str(tmp_path / "no-model"), "settings": {"generation": {}, "lora_scaling": None, "engine": "transformers"}}
    failed = {"id": str(clip), "audio": str(clip), "prompt": "Please describe the audio in detail.", "error": "missing", **run}
    output.write_text(json.dumps(failed) + "\n")
    assert read_done_ids(output) == set()  # an error is not done: the item is tried again
    for other, message in [
        ({"model": "another/model"}, "holds answers made with model='another/model'"),
        ({"settings": {**run["settings"], "lora_scaling": 2.0}}, "holds answers made with settings="),
        ({"prompt": "Transcribe."}, f"item {str(clip)!r} was answered for prompt 'Transcribe.'"),
    ]:
        answered = {**failed, "answer": "a dog", **other}
        del answered["error"]
        content = json.dumps(answered) + "\n"
        output.write_text(content)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert _infer(tmp_path, output) == 2
        assert message in caplog.text and "--overwrite_output_dir to start afresh" in caplog.text
        assert output.read_text() == content


def test_r2_a_full_disk_is_one_error_and_keeps_what_was_written(saved, tmp_path, monkeypatch, caplog):
    import errno

    from salmonn.inference import output as output_module
    from salmonn.inference.infer import main

    clips = [str(_wav(tmp_path / f"{name}.wav", 1.0)) for name in ("a", "b")]
    real_fsync, synced = os.fsync, []

    def full_after_one(fd):
        if synced:
            raise OSError(errno.ENOSPC, "No space left on device")
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(output_module.os, "fsync", full_after_one)
    out = tmp_path / "run"
    argv = ["--model", str(saved), "--output_dir", str(out), "--no_progress", "--num_beams", "1", "--max_new_tokens", "2",
            "--batch_size", "1", "--device", "cpu", *clips]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage().startswith(f"--output {str(out / 'predictions.jsonl')!r}: the disk is full (No space left on device)")
    first = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert first[0]["id"] == clips[0] and "answer" in first[0]


@pytest.mark.parametrize("field,value", [("reference", 42), ("hypothesis", ["a", "b"]), ("reference", ["ok", None])])
def test_r2_eval_non_string_fields_are_named(tmp_path, capsys, field, value):
    from salmonn.evaluation.evaluate import main

    record = {"id": "u7", "prompt": "p", "reference": "a b", "hypothesis": "a b", field: value}
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "asr", "--predictions", str(predictions)])
    assert exit_info.value.code == 2
    assert f"salmonn-eval: error: item 'u7': {field!r} must be a string" in capsys.readouterr().err


# -- issue 19 (round 2): audio that decodes to far more than its file size (items 3, 10) ---------------------------


def _silent_flac(path: Path, rate: int, channels: int, seconds: int) -> Path:
    with soundfile.SoundFile(str(path), "w", rate, channels, subtype="PCM_16", format="FLAC") as sound:
        block = np.zeros((rate, channels), dtype=np.int16)
        for _ in range(seconds):
            sound.write(block)
    return path


_PEAK_SCRIPT = """
import json, resource, sys
{setup}
read(sys.argv[2])  # a small file first: lazy imports and caches are not growth
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = read(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"growth_mb": (after - before) / 1024, **result}}))
"""


def _peak_rss_growth(setup: str, path: Path, small: Path) -> dict:
    """
    The peak RSS growth (MB) of `read(path)`, a function that `setup` defines, in a fresh interpreter, merged with the
    dict `read` returns; `read(small)` runs first, so that imports and caches do not count.
    """
    import subprocess
    import sys

    script = _PEAK_SCRIPT.format(setup=textwrap.dedent(setup))
    result = subprocess.run([sys.executable, "-c", script, str(path), str(small)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# 8 channels of silence at 384 kHz for 6 s: a 20 KB FLAC that decodes to 147 MB of float64 in one piece.
_HUGE_SECONDS = 6
_HUGE_WHOLE_MB = _HUGE_SECONDS * 384000 * 8 * 8 / 2**20


def _huge_and_small_flac(tmp_path: Path) -> tuple[Path, Path]:
    huge = _silent_flac(tmp_path / "huge.flac", 384000, 8, _HUGE_SECONDS)
    assert huge.stat().st_size < 100_000
    return huge, _silent_flac(tmp_path / "small.flac", 384000, 8, 1)


def test_r2_compressed_audio_is_decoded_in_bounded_memory(tmp_path):
    huge, small = _huge_and_small_flac(tmp_path)
    setup = """
        from salmonn.audio import load_mono_16k

        def read(path):
            encoded = open(path, "rb").read()  # the bytes of an upload
            audio = load_mono_16k(encoded, "audio")
            return {"samples": len(audio), "peak": float(abs(audio).max())}
    """
    measured = _peak_rss_growth(setup, huge, small)
    assert measured["samples"] == _HUGE_SECONDS * 16000 and measured["peak"] == 0.0
    assert measured["growth_mb"] < 30 < _HUGE_WHOLE_MB / 4, measured  # about the 16 kHz mono result plus one block


def test_r2_processor_reads_a_compressed_path_in_bounded_memory(saved, tmp_path):
    # The processor as a user loads it (its remote code), given the path: the same block reader as salmonn-infer.
    huge, small = _huge_and_small_flac(tmp_path)
    setup = f"""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)

        def read(path):
            features = processor(text=processor.format_prompt("Describe."), audio=path)
            return {{"segments": len(features["input_features"]), "frames": int(features["input_values_mask"].sum())}}
    """
    measured = _peak_rss_growth(setup, huge, small)
    assert measured["segments"] == 1 and measured["frames"] == 1 + (_HUGE_SECONDS * 16000 - 400) // 160
    assert measured["growth_mb"] < 30 < _HUGE_WHOLE_MB / 4, measured  # the features, not the decoded file


def test_r2_training_reader_decodes_a_compressed_file_in_bounded_memory(tmp_path):
    # Training keeps the file's own rate (the collator resamples): channel 0 at 384 kHz, 18 MB, not all 8 channels.
    huge, small = _huge_and_small_flac(tmp_path)
    setup = """
        from salmonn.audio import read_audio

        def read(path):
            audio, rate = read_audio(path)
            return {"samples": len(audio), "rate": rate, "peak": float(abs(audio).max())}
    """
    measured = _peak_rss_growth(setup, huge, small)
    assert measured["samples"] == _HUGE_SECONDS * 384000 and measured["rate"] == 384000 and measured["peak"] == 0.0
    channel_0_mb = _HUGE_SECONDS * 384000 * 8 / 2**20
    assert measured["growth_mb"] < channel_0_mb + 12 < _HUGE_WHOLE_MB / 4, measured  # the result plus one block


def test_r2_block_decoding_gives_the_samples_of_the_whole_file_reader(tmp_path):
    from modeling_salmonn.feature_extraction_salmonn import DECODE_BLOCK_FRAMES
    from salmonn.audio import load_mono_16k, read_audio, resample

    rng = np.random.default_rng(0)
    stereo = 0.2 * rng.standard_normal((3 * DECODE_BLOCK_FRAMES + 123, 2))
    soundfile.write(str(tmp_path / "s.wav"), stereo, 44100, subtype="PCM_16")
    whole, rate = read_audio(tmp_path / "s.wav")
    np.testing.assert_array_equal(load_mono_16k(tmp_path / "s.wav"), resample(whole, rate))


@pytest.mark.parametrize("fmt,subtype,rate", [("WAV", "PCM_16", 44100), ("FLAC", "PCM_24", 48000), ("OGG", "VORBIS", 22050), ("WAV", "FLOAT", 16000)])
def test_r2_block_reader_gives_every_path_the_samples_of_the_whole_file(tiny, tmp_path, fmt, subtype, rate):
    from salmonn.audio import read_audio

    _, processor = tiny
    stereo = 0.2 * np.random.default_rng(0).standard_normal((int(32.5 * rate), 2))  # past the 31 s truncation reads
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(str(path), stereo, rate, format=fmt, subtype=subtype)
    whole, file_rate = soundfile.read(str(path), dtype="float64")  # what every path decoded before, all at once
    training, training_rate = read_audio(path)
    assert training_rate == rate
    np.testing.assert_array_equal(training, whole[:, 0])
    prompt = processor.format_prompt("Describe.")
    for truncation in (False, True):
        from_path = processor(text=prompt, audio=str(path), truncation=truncation)
        from_array = processor(text=prompt, audio=whole, sampling_rate=file_rate, truncation=truncation)
        assert from_path["input_features"].shape[0] == (1 if truncation else 2)
        for key in ("input_ids", "input_features", "input_values", "input_values_mask"):
            assert torch.equal(from_path[key], from_array[key]), (key, truncation)


def test_r2_absurd_headers_are_refused_before_decoding(tmp_path):
    from salmonn.audio import load_mono_16k

    path = _silent_flac(tmp_path / "many.flac", 384000, 8, 1)
    with pytest.raises(ValueError, match=r"item 'x': audio file '.*many\.flac' would decode to 3072000 samples \(384000 frames x 8 channels"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("modeling_salmonn.feature_extraction_salmonn.MAX_DECODED_SAMPLES", 1_000_000)
            load_mono_16k(path, "item 'x'")
    soundfile.write(str(tmp_path / "fast.wav"), np.zeros(10), 500000)
    with pytest.raises(ValueError, match=r"declares a sampling rate of 500000 Hz; expected 1 to 384000 Hz"):
        load_mono_16k(tmp_path / "fast.wav", "item 'x'")


def test_r2_wav_cut_short_is_refused_naming_the_file(tiny, tmp_path):
    from salmonn.inference.engine import prepare_item
    from salmonn.inference.web import stream_answer

    model, processor = tiny
    whole = _wav(tmp_path / "whole.wav", 2.0).read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[: len(whole) // 2])
    message = rf"audio file '{cut}' is cut short: its header announces 64000 bytes of audio but the file holds 31978"
    with pytest.raises(ValueError, match=rf"item 'x': {message}"):
        prepare_item(processor, {"id": "x", "audio": str(cut), "prompt": "Describe."})
    with pytest.raises(ValueError, match=rf"audio\[0\]: {message}"):  # salmonn-web's uploads take the same reader
        stream_answer(model, processor, "Describe.", audio=str(cut))


# -- processor and feature extractor (cases 5, 6, 16, 20) -------------------------------------------------------


def test_case5_absurd_amplitude_is_refused_naming_the_item(tiny, tmp_path):
    from salmonn.inference.engine import prepare_item

    _, processor = tiny
    with pytest.raises(ValueError, match=r"audio\[0\]: the audio's largest sample is 3e\+29"):
        processor(text=processor.format_prompt("Describe."), audio=_tone(1.0) * 1e30, sampling_rate=SR)
    with pytest.raises(ValueError, match=r"item 'loud': the audio's largest sample is 3e\+29"):
        prepare_item(processor, {"id": "loud", "audio": _tone(1.0) * 1e30, "sampling_rate": SR, "prompt": "Describe."})
    # A float waveform at int16 scale is still accepted (and gives finite features).
    inputs = processor(text=processor.format_prompt("Describe."), audio=_tone(1.0) * 32767, sampling_rate=SR)
    assert torch.isfinite(inputs["input_features"]).all() and torch.isfinite(inputs["input_values"]).all()


def test_case6_user_text_never_becomes_audio_placeholders(tiny):
    _, processor = tiny
    audio_id = processor.audio_token_id
    per_segment = processor.audio_tokens_per_segment
    prompt = processor.format_prompt("What does <audio> mean? <audio><audio>")
    inputs = processor(text=prompt, audio=_tone(1.0), sampling_rate=SR, text_target="It says <audio>.")
    ids = inputs["input_ids"][0]
    assert int((ids == audio_id).sum()) == per_segment  # exactly one segment's placeholders, from the real audio
    placeholders = (ids == audio_id).nonzero().flatten()
    assert placeholders.tolist() == list(range(int(placeholders[0]), int(placeholders[0]) + per_segment))
    assert "<audio>" in processor.decode(ids[placeholders[-1] + 1 :], skip_special_tokens=False)
    assert int((processor(text="USER: <audio>\nASSISTANT:")["input_ids"] == audio_id).sum()) == 0
    # Text without the literal is tokenized exactly as the tokenizer does it.
    plain = processor(text="USER: hello </s> there")["input_ids"][0].tolist()
    assert plain == [processor.tokenizer.bos_token_id] + processor.tokenizer("USER: hello </s> there", add_special_tokens=False)["input_ids"]


def test_case16_zero_chunk_length_is_a_clear_error(tmp_path):
    from modeling_salmonn.feature_extraction_salmonn import SalmonnFeatureExtractor

    with pytest.raises(ValueError, match=r"`chunk_length` must be a positive integer, got 0"):
        SalmonnFeatureExtractor(chunk_length=0)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**SalmonnFeatureExtractor().to_dict(), "chunk_length": 0, "hop_length": 160})
    )
    with pytest.raises(ValueError, match=r"`chunk_length` must be a positive integer, got 0"):
        SalmonnFeatureExtractor.from_pretrained(tmp_path)


def test_case20_paths_that_are_not_files_are_named(tiny, tmp_path):
    _, processor = tiny
    prompt = processor.format_prompt("Describe.")
    with pytest.raises(ValueError, match=r"^audio\[0\]: audio file 'a' does not exist$"):
        processor(text=prompt, audio=["a", "b"])
    with pytest.raises(ValueError, match=r"^audio\[0\]: '.*' is a folder, not an audio file$"):
        processor(text=prompt, audio=str(tmp_path))


# -- manifests written by spreadsheets (case 19) ---------------------------------------------------------------


def test_case19_csv_with_a_byte_order_mark_is_read(tmp_path):
    from salmonn.evaluation.items import _read_rows
    from salmonn.inference.infer import expand_inputs
    from salmonn.training.data import load_manifest

    clip = _wav(tmp_path / "clip.wav", 1.0)
    manifest = tmp_path / "sheet.csv"
    manifest.write_bytes("\ufeffaudio,prompt,id\nclip.wav,Describe it.,c1\n".encode("utf-8"))
    assert expand_inputs([str(manifest)], "default") == [{"id": "c1", "audio": str(clip), "prompt": "Describe it."}]
    assert _read_rows(manifest) == [{"audio": "clip.wav", "prompt": "Describe it.", "id": "c1"}]
    train = tmp_path / "train.csv"
    train.write_bytes("\ufeffpath,text,task\nclip.wav,a tone,audiocaption\n".encode("utf-8"))
    (item,) = load_manifest(train)
    assert item["path"] == str(clip) and item["text"] == "a tone" and item["task"] == "audiocaption"


# -- audio files: length from the header, folders and devices (cases 8, 18) ---------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails any full decode; records the `frames` of partial reads."""
    reads = []
    real_read = soundfile.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        if frames < 0:
            raise AssertionError(f"{self.name} was decoded whole")
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(soundfile.SoundFile, "read", read)
    return reads


def test_case8_too_long_file_is_refused_from_its_header(tiny, tmp_path, monkeypatch, no_decoding):
    from salmonn.inference.engine import prepare_item

    _, processor = tiny
    monkeypatch.setattr(processor.feature_extractor, "max_audio_seconds", 2.0)
    path = _wav(tmp_path / "long.wav", 3.0, rate=48000, channels=2)
    with pytest.raises(ValueError, match=r"audio\[0\] \(.*long\.wav'\): the audio is 3\.00 s long, longer than max_audio_seconds=2\.0"):
        processor(text=processor.format_prompt("Describe."), audio=str(path))
    with pytest.raises(ValueError, match=r"item 'x' \(.*long\.wav'\): the audio is 3\.00 s long, longer than max_audio_seconds=2\.0"):
        prepare_item(processor, {"id": "x", "audio": str(path), "prompt": "Describe."})
    assert no_decoding == []


def test_case8_truncation_reads_only_the_first_31_seconds(tiny, tmp_path, no_decoding):
    _, processor = tiny
    path = _wav(tmp_path / "long.wav", 40.0, rate=8000)
    inputs = processor(text=processor.format_prompt("Describe."), audio=str(path), truncation=True)
    from modeling_salmonn.feature_extraction_salmonn import DECODE_BLOCK_FRAMES

    assert sum(no_decoding) == 31 * 8000 and max(no_decoding) == DECODE_BLOCK_FRAMES  # in blocks
    assert inputs["input_features"].shape[0] == 1


def test_case8_web_upload_size_is_limited(monkeypatch, tmp_path):
    import gradio

    from salmonn.inference import web

    launched = {}
    fake_model = type("FakeModel", (), {"device": torch.device("cpu"), "dtype": torch.float32})()
    monkeypatch.setattr(web, "load_model_and_processor", lambda *a, **k: (fake_model, None))
    monkeypatch.setattr(web, "build_demo", lambda *a, **k: gradio.Blocks())
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    assert web.main(["--model", "m", "--device", "cpu"]) == 0
    assert launched["max_file_size"] == "50mb"
    assert web.main(["--model", "m", "--device", "cpu", "--max_file_size", "5mb"]) == 0
    assert launched["max_file_size"] == "5mb"


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_case18_folder_or_device_is_named_for_what_it_is(tiny, tmp_path, kind):
    from salmonn.inference.engine import prepare_item

    _, processor = tiny
    path = tmp_path if kind == "folder" else Path("/dev/null")
    expected = "is a folder, not an audio file" if kind == "folder" else "is not a regular file (a device, pipe or socket)"
    with pytest.raises(ValueError, match=rf"item 'x': '{path}' {expected}".replace("(", r"\(").replace(")", r"\)")):
        prepare_item(processor, {"id": "x", "audio": str(path), "prompt": "Describe."})


# -- salmonn-web messages (case 21) ------------------------------------------------------------------------------


def test_case21_web_errors_hide_upload_paths_and_python_advice(tiny, tmp_path, monkeypatch):
    from salmonn.inference.web import web_error_message

    _, processor = tiny
    monkeypatch.setattr(processor.feature_extractor, "max_audio_seconds", 2.0)
    upload = tmp_path / "gradio" / "9f2c1e"
    upload.mkdir(parents=True)
    path = str(_wav(upload / "clip.wav", 3.0))
    with pytest.raises(ValueError) as caught:
        processor(text=processor.format_prompt("Describe."), audio=path)
    message = web_error_message(caught.value, path)
    assert str(tmp_path) not in message and "truncation=True" not in message
    assert message == (
        "audio[0] ('clip.wav'): the audio is 3.00 s long, longer than max_audio_seconds=2.0 s; upload a shorter clip "
        "(cut it to its first 30 s, for example)"
    )


# -- training (cases 3, 10, 11) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    from salmonn.training.synthetic import SOUND_CLASSES, write_dataset
    from tests.utils import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("train")
    classes = [c for c in SOUND_CLASSES if c.kind != "speech"]
    return {"base": save_tiny_checkpoint(root / "base"), "manifest": write_dataset(root / "data", 2, classes, seed=0)}


def _train_args(setup, out, *extra):
    return [
        "--stage", "pretrain", "--model_name_or_path", str(setup["base"]), "--train_file", str(setup["manifest"]),
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--warmup_steps", "0",
        "--dataloader_num_workers", "0", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none", *extra,
    ]


@pytest.mark.parametrize("flag,value", [("--learning_rate", "inf"), ("--learning_rate", "nan"), ("--min_lr", "inf")])
def test_case3_non_finite_learning_rate_is_refused(train_setup, tmp_path, capsys, flag, value):
    from salmonn.training.train import main

    out = tmp_path / "out"
    assert main(_train_args(train_setup, out, "--max_steps", "1", flag, value)) == 2
    assert f"{flag} must be a finite number >= 0, got {value}" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


def test_case3_non_finite_gradient_stops_training_and_saves_nothing(train_setup, tmp_path, capsys, monkeypatch):
    from salmonn.training.collator import SalmonnDataCollator
    from salmonn.training.train import main

    collate = SalmonnDataCollator.__call__

    def poisoned(self, features):  # finite features that overflow the encoders (NaN ones are refused by the model)
        batch = collate(self, features)
        batch["input_features"] = batch["input_features"] * 1e38
        return batch

    monkeypatch.setattr(SalmonnDataCollator, "__call__", poisoned)
    out = tmp_path / "out"
    assert main(_train_args(train_setup, out, "--max_steps", "2", "--save_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "step 1: the gradient norm is nan (batch ids [" in err and "training stopped before this update" in err
    assert not (out / "model.safetensors").exists()
    assert not list(out.glob("checkpoint-*"))


def test_case3_non_finite_weights_are_never_saved(tiny, tmp_path):
    from transformers import TrainingArguments

    from salmonn.training.trainer import NonFiniteTrainingError, SalmonnTrainer

    model, processor = tiny_model_and_processor()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = SalmonnTrainer(model=model, args=args, processing_class=processor)
    with pytest.raises(NonFiniteTrainingError, match=r"trainable weight\(s\) hold NaN or inf"):
        trainer.save_model()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _float_wav(path: Path, audio: np.ndarray) -> Path:
    soundfile.write(str(path), audio.astype(np.float32), SR, subtype="FLOAT")
    return path


@pytest.mark.parametrize("bad", ["nan", "huge"])
def test_case10_bad_samples_in_training_data_name_the_file(tmp_path, caplog, bad):
    from salmonn.training.data import SalmonnTrainDataset, load_manifest
    from salmonn.training.prompts import PromptPool

    audio = _tone(1.0)
    if bad == "nan":
        audio[100] = np.nan
    else:
        audio = audio * 1e30
    good = _float_wav(tmp_path / "good.wav", _tone(1.0))
    broken = _float_wav(tmp_path / "broken.wav", audio)
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps({"annotation": [
        {"path": str(good), "text": "a tone", "task": "audiocaption"},
        {"path": str(broken), "text": "a tone", "task": "audiocaption"},
    ]}))
    items = load_manifest(manifest)
    dataset = SalmonnTrainDataset(items, PromptPool(), name="train")
    assert dataset[0]["id"] == str(good)
    with caplog.at_level(logging.WARNING):
        assert dataset[1]["id"] == str(good)  # skipped for the next item, and said so
    expected = "non-finite sample(s)" if bad == "nan" else "samples up to 3e+29"
    assert f"train: item 1 skipped at load time: Audio {str(broken)!r}" in caplog.text and expected in caplog.text
    strict = SalmonnTrainDataset(items, PromptPool(), name="train", strict=True)
    with pytest.raises(ValueError, match=rf"train: item 1: Audio '{broken}' .*{'non-finite' if bad == 'nan' else 'samples up to'}"):
        strict[1]


def test_case11_resume_last_skips_incomplete_checkpoints(tmp_path, caplog):
    from salmonn.training.train import last_complete_checkpoint

    out = tmp_path / "out"
    complete = out / "checkpoint-2"
    complete.mkdir(parents=True)
    (complete / "trainer_state.json").write_text("{}")
    (complete / "model.safetensors").write_bytes(b"x")
    (out / "checkpoint-4").mkdir()  # killed while saving: empty
    half = out / "checkpoint-3"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")  # weights, but no trainer state yet
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(out)) == str(complete)
    assert f"Skipping {out / 'checkpoint-4'}: incomplete checkpoint (no trainer_state.json)" in caplog.text
    assert f"Skipping {half}: incomplete checkpoint (no trainer_state.json)" in caplog.text
    assert last_complete_checkpoint(str(tmp_path / "none")) is None


def test_case11_resume_last_trains_on_from_the_complete_checkpoint(train_setup, tmp_path, capsys):
    from salmonn.training.train import main

    out = tmp_path / "out"
    assert main(_train_args(train_setup, out, "--max_steps", "1", "--save_steps", "1")) == 0
    (out / "checkpoint-2").mkdir()  # a kill during the next save
    assert main(_train_args(train_setup, out, "--max_steps", "2", "--save_steps", "1", "--resume_from_checkpoint", "last")) == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_issue19_case2_second_run_into_a_finished_run_is_refused_then_overwrite_replaces_it(train_setup, tmp_path, capsys):
    from salmonn.training.train import main

    out = tmp_path / "out"
    assert main(_train_args(train_setup, out, "--max_steps", "1", "--save_steps", "1")) == 0
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    capsys.readouterr()
    assert main(_train_args(train_setup, out, "--max_steps", "2", "--seed", "5")) == 2
    assert capsys.readouterr().err.strip() == (
        f"salmonn-train: error: --output_dir {str(out)!r} is not empty: it holds a run saved up to checkpoint-1. Add "
        "--resume_from_checkpoint last to continue the run saved there, --overwrite_output_dir to replace it with this "
        "run, or choose a new folder"
    )
    assert _tree(out) == before

    (out / "checkpoint-7").mkdir()  # a later checkpoint of the earlier run: `last` would pick it
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    assert main(_train_args(train_setup, out, "--max_steps", "2", "--save_steps", "2", "--overwrite_output_dir")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"  # what no run wrote stays


@pytest.mark.parametrize("relation", ["is", "is inside", "holds"])
def test_issue19_case2_output_dir_and_the_base_model_folder_are_apart(tmp_path, capsys, relation):
    from tests.utils import save_tiny_checkpoint
    from salmonn.training.train import main

    base = save_tiny_checkpoint(tmp_path / "models" / "base")
    out = {"is": base, "is inside": base / "run", "holds": tmp_path / "models"}[relation]
    before = _tree(tmp_path)
    setup = {"base": base, "manifest": tmp_path / "train.json"}
    assert main(_train_args(setup, out, "--max_steps", "1", "--overwrite_output_dir")) == 2
    assert f"--output_dir {str(out)!r} {relation} the folder of --model_name_or_path {str(base)!r}" in capsys.readouterr().err
    assert _tree(tmp_path) == before and not (base / "run").exists()


def test_issue19_case2_overwrite_never_replaces_an_input_and_resume_stays_in_its_run(train_setup, tmp_path, capsys):
    from salmonn.training.train import main

    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "train.json"
    manifest.write_bytes(Path(train_setup["manifest"]).read_bytes())
    setup = {"base": train_setup["base"], "manifest": manifest}
    assert main(_train_args(setup, out, "--max_steps", "1")) == 2
    assert f"--output_dir {str(out)!r} is not empty: it holds train.json. Add --resume_from_checkpoint" in capsys.readouterr().err
    assert main(_train_args(setup, out, "--max_steps", "1", "--overwrite_output_dir")) == 2
    assert f"--output_dir {str(out)!r} holds --train_file {str(manifest)!r}; --overwrite_output_dir would" in capsys.readouterr().err
    assert main(_train_args(setup, out, "--max_steps", "1", "--overwrite_output_dir", "--resume_from_checkpoint", "last")) == 2
    assert "--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one" in capsys.readouterr().err
    other = tmp_path / "other" / "checkpoint-1"
    other.mkdir(parents=True)
    assert main(_train_args(setup, out, "--max_steps", "1", "--resume_from_checkpoint", str(other))) == 2
    assert f"is not one of its checkpoints: resuming into it would mix two runs" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["train.json"]


def _audio_manifest(tmp_path, paths) -> Path:
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(p), "text": "a tone", "task": "audiocaption"}) + "\n" for p in paths))
    return manifest


def test_issue19_case8_one_bad_audio_body_does_not_end_a_run(train_setup, tmp_path, capsys, caplog):
    from salmonn.training.train import main

    good = [_float_wav(tmp_path / f"good{k}.wav", _tone(0.5 + k / 4)) for k in range(2)]
    nan = _tone(1.0)
    nan[10] = np.nan
    bad = _float_wav(tmp_path / "bad.wav", nan)  # a sound header: only decoding finds it
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(100))  # found at load time when the headers are not checked first
    setup = {"base": train_setup["base"], "manifest": _audio_manifest(tmp_path, [good[0], bad, good[1], corrupt])}
    args = ["--max_steps", "4", "--per_device_train_batch_size", "1", "--save_strategy", "no", "--verify_audio", "false"]
    with caplog.at_level(logging.WARNING):
        assert main(_train_args(setup, tmp_path / "out", *args)) == 0
    assert f"item 1 skipped at load time: Audio {str(bad)!r} has 1 non-finite sample(s)" in caplog.text
    assert f"item 2 ({str(good[1])!r}) is used in its place" in caplog.text
    assert f"item 3 skipped at load time: {corrupt}: cannot decode audio file" in caplog.text
    assert f"item 0 ({str(good[0])!r}) is used in its place" in caplog.text
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 4
    assert main(_train_args(setup, tmp_path / "strict", *args, "--strict_data", "true")) == 2
    err = capsys.readouterr().err
    first_bad = f"item 1: Audio {str(bad)!r} has 1 non-finite sample(s)", f"item 3: {corrupt}: cannot decode audio file"
    assert any(f"salmonn-train: error: train: {message}" in err for message in first_bad)  # whichever the shuffle meets first
    assert not (tmp_path / "strict" / "model.safetensors").exists()


def test_issue19_case7_num_train_epochs_beats_the_recipes_max_steps(train_setup, tmp_path, caplog):
    from salmonn.training.train import main

    items = len(json.loads(Path(train_setup["manifest"]).read_text())["annotation"])
    with caplog.at_level(logging.INFO):
        assert main(_train_args(train_setup, tmp_path / "out", "--num_train_epochs", "1", "--save_strategy", "no", "--log_level", "info")) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == -(-items // 2) and state["epoch"] == 1.0  # not the recipe's 90,000 steps
    assert "Training length: 1 epoch(s) (--num_train_epochs)" in caplog.text


def test_issue19_case5_jsonl_train_file_is_split_at_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 are valid inside JSON strings; str.splitlines() would cut the record there."""
    from salmonn.training.data import load_manifest

    text = "say \u2028 this\u2029 and\u0085 that"
    record = json.dumps({"audio": str(_wav(tmp_path / "a.wav", 0.5)), "text": text}, ensure_ascii=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes((record + "\r\n\n" + record).encode("utf-8"))
    assert [item["text"] for item in load_manifest(manifest)] == [text, text]


def test_issue19_case2_export_refuses_an_output_folder_that_is_or_holds_an_input(tmp_path, caplog, capsys):
    from salmonn.training.export import TRAINABLE_EXPORT_NAME, main

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    run = tmp_path / "run"
    run.mkdir()
    export = run / TRAINABLE_EXPORT_NAME
    export.write_bytes(b"export")
    before = _tree(tmp_path)
    for output, relation, flag, value in ((run, "holds", "--export", export), (base, "is", "--model_name_or_path", base)):
        caplog.clear()
        argv = ["--model_name_or_path", str(base), "--export", str(export), "--output_dir", str(output), "--overwrite_output_dir"]
        assert main(argv) == 2
        assert f"--output_dir {str(output)!r} {relation} the input {flag} {str(value)!r}; writing the merged model there" in caplog.text
    assert _tree(tmp_path) == before
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m salmonn.training.export ")


# -- salmonn-convert (cases 4, 13, 17) ----------------------------------------------------------------------------


def _convert_args(output, checkpoint=None):
    from tests.utils import fixture_a_convert_args

    args = fixture_a_convert_args(output, "--verify", "structure")
    if checkpoint is not None:
        args[1] = str(checkpoint)
    return args


def _edited_checkpoint(tmp_path, edit) -> Path:
    from tests.utils import FIXTURE_A

    checkpoint = torch.load(FIXTURE_A / "salmonn.pth", weights_only=True)
    edit(checkpoint)
    path = tmp_path / "edited.pth"
    torch.save(checkpoint, path)
    return path


def _convert_fails(tmp_path, caplog, checkpoint=None) -> str:
    from salmonn.conversion.convert_salmonn import main

    before = sorted(p.name for p in tmp_path.iterdir())
    with caplog.at_level(logging.ERROR):
        assert main(_convert_args(tmp_path / "out", checkpoint)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no hidden temporary folder
    return caplog.text


def test_case4_integer_weights_are_an_error_naming_the_key(tmp_path, caplog):
    def to_int(checkpoint):
        key = "speech_llama_proj.weight"
        checkpoint["model"][key] = checkpoint["model"][key].to(torch.int64)

    text = _convert_fails(tmp_path, caplog, _edited_checkpoint(tmp_path, to_int))
    assert "Weights that must be floating point are not: ['model.speech_llama_proj.weight (torch.int64)']" in text


def test_case17_bad_config_value_and_random_bytes_name_the_file(tmp_path, caplog):
    def bad_alpha(checkpoint):
        checkpoint.setdefault("config", {}).setdefault("model", {})["lora_alpha"] = "abc"

    path = _edited_checkpoint(tmp_path, bad_alpha)
    assert f"{path}: `config.model.lora_alpha` must be a number, got 'abc'" in _convert_fails(tmp_path, caplog, path)
    caplog.clear()
    garbage = tmp_path / "garbage.pth"
    for seed in (0, 17, 54, 62):  # UnpicklingError, IndexError, UnicodeDecodeError, KeyError inside torch.load
        garbage.write_bytes(np.random.default_rng(seed).bytes(4096))
        assert f"SALMONN checkpoint {garbage} is not a torch checkpoint" in _convert_fails(tmp_path, caplog, garbage)
        caplog.clear()


@pytest.mark.parametrize("where", ["full-disk", "read-only"])
def test_case13_unwritable_output_is_a_clear_error_and_leaves_nothing(tmp_path, caplog, monkeypatch, where):
    import errno

    import salmonn.conversion.io_utils as io_utils

    if where == "full-disk":
        def fail(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(io_utils, "write_safetensors_streaming", fail)
        reason = "No space left on device"
    else:
        def fail(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(io_utils.tempfile, "mkdtemp", fail)
        reason = "Read-only file system"
    text = _convert_fails(tmp_path, caplog)
    assert f"Cannot write the output folder {tmp_path / 'out'}: {reason}" in text
    assert "Traceback" not in text


def test_case13_rerun_removes_the_leftovers_of_a_killed_conversion(tmp_path, caplog):
    import subprocess
    import sys

    from salmonn.conversion.convert_salmonn import main
    from salmonn.conversion.io_utils import MARKER

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / ".out.tmp-k1ll3d"
    stale.mkdir()
    (stale / MARKER).write_text(dead.stdout.strip())
    (stale / "model.safetensors").write_bytes(b"complete-looking")
    foreign = tmp_path / ".out.tmp-mine"  # a look-alike this tool did not write: left alone
    foreign.mkdir()
    with caplog.at_level(logging.WARNING):
        assert main(_convert_args(tmp_path / "out")) == 0
    assert not stale.exists() and foreign.is_dir()
    assert f"Removing {stale}, left by an interrupted run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-mine", "out"]
    assert not (tmp_path / "out" / MARKER).exists()


# -- loading a saved folder (cases 7, 12, 15) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tests.utils import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("saved") / "tiny")


def _edited_copy(saved: Path, tmp_path: Path, edit, name: str = "config.json") -> Path:
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    config = json.loads((folder / name).read_text())
    edit(config)
    (folder / name).write_text(json.dumps(config))
    return folder


def test_case7_missing_sub_config_is_an_error_before_building_anything(saved, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModel

    from modeling_salmonn.configuration_salmonn import SalmonnConfig

    folder = _edited_copy(saved, tmp_path, lambda c: c.pop("text_config"))
    expected = r"This SALMONN config.json has no `text_config`: a saved SALMONN folder must describe all of"
    with pytest.raises(ValueError, match=expected):
        AutoConfig.from_pretrained(folder, trust_remote_code=True)
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: built.append(self))
    with pytest.raises(ValueError, match=expected):
        AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert built == []  # refused before a single module was made
    monkeypatch.undo()
    both = _edited_copy(saved, tmp_path / "2", lambda c: (c.pop("text_config"), c.pop("beats_config")))
    with pytest.raises(ValueError, match=r"has no `beats_config`, `text_config`"):
        SalmonnConfig.from_pretrained(both)
    assert SalmonnConfig().text_config.hidden_size == 5120  # a default config built in Python still works


def test_case15_audio_token_index_is_validated(saved, tmp_path, tiny):
    from transformers import AutoModel

    from modeling_salmonn.configuration_salmonn import SalmonnConfig

    for bad in (-1, "abc", 3.5):
        with pytest.raises(ValueError, match=rf"`audio_token_index` must be a non-negative integer token id .*got {bad!r}"):
            SalmonnConfig.from_pretrained(_edited_copy(saved, tmp_path / f"bad{bad}", lambda c: c.update(audio_token_index=bad)))
    # 0 (a real token) and 99999 are not the tokenizer's <audio> id (401): the forward names the disagreement.
    _, processor = tiny
    inputs = processor(text=processor.format_prompt("Describe."), audio=_tone(1.0), sampling_rate=SR)
    for index in (0, 99999):
        folder = _edited_copy(saved, tmp_path / str(index), lambda c: c.update(audio_token_index=index))
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        with pytest.raises(ValueError, match=rf"`input_ids` holds id 401, outside the language model's vocabulary of 401, which is not the audio placeholder \(config.audio_token_index={index}\)"):
            model(**inputs)


def test_case22_output_loading_info_returns_the_model_and_the_info(saved):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(saved, trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "SalmonnForConditionalGeneration" and model.lm_head.weight.shape[0] > 0
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize(
    "first, second, message",
    [
        (float("nan"), float("inf"), "hold NaN or inf values"),
        (5e37, -3e12, "hold values above 1e+10 in size"),  # round 2 (issue #19): finite but absurd
    ],
    ids=["non-finite", "absurd"],
)
def test_case12_non_finite_weights_are_named_at_load(saved, tmp_path, caplog, first, second, message):
    import shutil

    from safetensors.torch import load_file, save_file

    from modeling_salmonn.modeling_salmonn import SalmonnForConditionalGeneration

    folder = tmp_path / "nan"
    shutil.copytree(saved, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.speech_llama_proj.weight"][0, 0] = first
    weights["lm_head.weight"][3, 1] = second
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        SalmonnForConditionalGeneration.from_pretrained(folder)
    assert f"2 loaded weight tensor(s) {message}: ['model.speech_llama_proj.weight', 'lm_head.weight']" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        SalmonnForConditionalGeneration.from_pretrained(saved)
    assert "loaded weight tensor(s)" not in caplog.text


# -- generation (case 9) -----------------------------------------------------------------------------------------


def test_case9_prompt_longer_than_the_context_is_refused_and_answers_stop_at_its_end(tiny, caplog):
    model, processor = tiny
    limit = model.config.text_config.max_position_embeddings
    generator = torch.Generator().manual_seed(0)
    too_long = torch.randint(3, 300, (1, limit + 5), generator=generator)
    with pytest.raises(ValueError, match=rf"The prompt is {limit + 5} positions long .* but the language model's context is {limit}"):
        model.generate(too_long, max_new_tokens=4)
    inputs = processor(text=processor.format_prompt("Describe."), audio=_tone(1.0), sampling_rate=SR)
    ids = torch.cat([inputs["input_ids"][:, :1], torch.randint(3, 300, (1, limit - 6 - inputs["input_ids"].shape[1]), generator=generator), inputs["input_ids"][:, 1:]], dim=1)
    near_end = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with caplog.at_level(logging.WARNING):
        out = model.generate(**near_end, max_new_tokens=50, num_beams=1, do_sample=False, eos_token_id=None)
    assert out.shape[1] - ids.shape[1] == 6 and ids.shape[1] + 6 == limit
    assert "the answer is cut at 6 new tokens instead of max_new_tokens=50" in caplog.text


# -- offloading (case 23) ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error:The following device_map keys do not match")  # none about the query parameter
def test_case23_each_module_offloaded_in_turn_gives_the_same_ids(saved, tmp_path, tiny):
    from modeling_salmonn.modeling_salmonn import SalmonnForConditionalGeneration

    _, processor = tiny
    model = SalmonnForConditionalGeneration.from_pretrained(saved).eval()
    inputs = processor(text=processor.format_prompt("Describe."), audio=_tone(1.5), sampling_rate=SR)
    settings = [dict(num_beams=1, do_sample=False), dict(num_beams=4, do_sample=False)]
    expected = [model.generate(**inputs, max_new_tokens=6, **setting) for setting in settings]
    modules = [f"model.{name}" for name, _ in model.model.named_children()] + ["lm_head"]
    assert "model.beats" in modules and "model.speech_encoder" in modules
    # Each module on disk in turn (its weights stay on "meta" until its hook loads them), then all of them at once.
    maps = [{**{name: "cpu" for name in modules}, offloaded: "disk"} for offloaded in modules]
    maps.append({name: "disk" for name in modules})
    for device_map in maps:
        device_map["model.speech_query_tokens"] = "cpu"  # a bare parameter of SalmonnModel, not a module
    for k, device_map in enumerate(maps):
        loaded = SalmonnForConditionalGeneration.from_pretrained(
            saved, device_map=device_map, offload_folder=str(tmp_path / f"offload-{k}")
        ).eval()
        assert loaded.model.beats.encoder.relative_attention_bias.weight.device.type == (
            "meta" if device_map["model.beats"] == "disk" else "cpu"
        )
        for setting, want in zip(settings, expected):
            got = loaded.generate(**inputs, max_new_tokens=6, **setting)
            assert torch.equal(got, want), (device_map, setting)


# ================================================================================================================
# Round 2 (issue #19): conversion, config values, loading and model inputs. Helpers of this block are local to it.
# ================================================================================================================


def _r2_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what "nothing deleted, nothing changed" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def r2_release(tmp_path) -> Path:
    """A folder that holds the original release's parts, as a user keeps them: salmonn.pth, whisper/, llm/, beats.pt."""
    import shutil

    from tests.utils import FIXTURE_A

    release = tmp_path / "release"
    release.mkdir()
    for name in ("salmonn.pth", "beats.pt"):
        shutil.copyfile(FIXTURE_A / name, release / name)
    for name in ("whisper", "llm"):
        shutil.copytree(FIXTURE_A / name, release / name)
    return release


def _r2_convert_args(release: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--salmonn-checkpoint", str(release / "salmonn.pth"), "--whisper", str(release / "whisper"),
        "--beats", str(release / "beats.pt"), "--llm", str(release / "llm"), "--output", str(output),
        "--qformer-num-attention-heads", "4", "--verify", "structure", *extra,
    ]


@pytest.mark.parametrize(
    "where, relation, flag",
    [
        ("release", "holds", "--salmonn-checkpoint"),  # the folder holding every input
        ("release/llm", "is", "--llm"),
        ("release/whisper/converted", "lies inside", "--whisper"),
    ],
)
def test_r2_case1_output_that_holds_is_or_is_inside_an_input_is_refused(r2_release, caplog, where, relation, flag):
    from salmonn.conversion.convert_salmonn import main

    before = _r2_snapshot(r2_release.parent)
    output = r2_release.parent / where
    with caplog.at_level(logging.ERROR):
        assert main(_r2_convert_args(r2_release, output, "--overwrite")) == 1
    assert f"--output {output} {relation} the input {flag}" in caplog.text
    assert _r2_snapshot(r2_release.parent) == before  # nothing deleted, nothing written


def test_r2_case1_output_reached_through_a_symlink_is_refused(r2_release, caplog):
    from salmonn.conversion.convert_salmonn import main

    link = r2_release.parent / "link-to-release"
    link.symlink_to(r2_release)
    before = _r2_snapshot(r2_release)
    with caplog.at_level(logging.ERROR):
        assert main(_r2_convert_args(r2_release, link, "--overwrite")) == 1
    assert f"--output {link} holds the input --salmonn-checkpoint" in caplog.text
    assert _r2_snapshot(r2_release) == before and link.is_symlink()


def test_r2_case1_convert_beats_into_the_folder_of_its_checkpoint_is_refused(r2_release, capsys):
    from salmonn.conversion.convert_beats import main

    before = _r2_snapshot(r2_release)
    assert main(["--beats", str(r2_release / "beats.pt"), "--output", str(r2_release), "--overwrite"]) == 1
    assert f"--output {r2_release} holds the input --beats {r2_release / 'beats.pt'}" in capsys.readouterr().err
    assert _r2_snapshot(r2_release) == before


def test_r2_case1_check_output_not_input_is_reusable(tmp_path):
    from salmonn.conversion.io_utils import check_output_not_input

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    check_output_not_input(tmp_path / "out", {"--train_file": data / "train.jsonl", "--model": "org/hub-id", "--x": None})
    with pytest.raises(ValueError, match=r"--output_dir .*data holds the input --train_file"):
        check_output_not_input(data, {"--train_file": data / "train.jsonl"}, flag="--output_dir")


def _r2_convert_fails(release: Path, caplog, *extra: str) -> str:
    from salmonn.conversion.convert_salmonn import main

    output = release.parent / "out"
    with caplog.at_level(logging.ERROR):
        assert main(_r2_convert_args(release, output, *extra)) == 1
    assert not output.exists() and not list(release.parent.glob(".out.*"))
    return caplog.text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--second-stride", "0.001"], "`second_stride`=0.001 is 0 Whisper frames of 0.02 s; it must be at least half a frame (0.01 s)"),
        (["--second-per-window", "0.005"], "`second_per_window`=0.005 is 0 Whisper frames of 0.02 s"),
        (["--lora-alpha", "-32"], "`lora_alpha` must be a finite number >= 0, got -32.0"),
    ],
)
def test_r2_case9_converter_refuses_window_and_lora_flags_that_make_no_model(r2_release, caplog, flags, message):
    text = _r2_convert_fails(r2_release, caplog, *flags)
    assert "The window and LoRA settings (flags, else `config.model` of" in text and message in text
    assert "ZeroDivisionError" not in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"second_stride": 0.001}, "`second_stride`=0.001 is 0 Whisper frames"),
        ({"second_per_window": 0.004}, "`second_per_window`=0.004 is 0 Whisper frames"),
        ({"second_stride": "0.33"}, "`second_stride` must be a finite number > 0, got '0.33'"),
        ({"lora_alpha": "32"}, "`lora_alpha` must be a finite number >= 0, got '32'"),
        ({"lora_alpha": -4}, "`lora_alpha` must be a finite number >= 0, got -4"),
        ({"num_query_tokens": 0}, "`num_query_tokens` must be an integer >= 1, got 0"),
    ],
)
def test_r2_case9_model_config_values_are_validated_at_load(saved, tmp_path, overrides, message):
    from transformers import AutoConfig

    folder = _edited_copy(saved, tmp_path, lambda c: c.update(overrides))
    with pytest.raises(ValueError, match=re_escape(message)):
        AutoConfig.from_pretrained(folder, trust_remote_code=True)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("processor", "audio_tokens_per_segment", 10**8, "`audio_tokens_per_segment` must be an integer from 1 to 8192, got 100000000"),
        ("feature_extractor", "min_seconds", 1e5, "`min_seconds` must be a number of seconds from 0 to 30, got 100000.0"),
        ("feature_extractor", "chunk_length", 10**7, "`chunk_length` must be 30 (what Whisper and BEATs read), got 10000000"),
        ("feature_extractor", "fbank_std", 0, "`fbank_std` must be a positive finite number (BEATs fbank normalisation), got 0"),
        ("feature_extractor", "sampling_rate", 8000, "`sampling_rate` must be 16000 (what Whisper and BEATs read), got 8000"),
        ("feature_extractor", "feature_size", 64, "`feature_size` must be 80 or 128 (what Whisper and BEATs read), got 64"),
        ("feature_extractor", "beats_num_mel_bins", 80, "`beats_num_mel_bins` must be 128 (what Whisper and BEATs read), got 80"),
        ("feature_extractor", "hop_length", 320, "`hop_length` must be 160 (what Whisper and BEATs read), got 320"),
        ("feature_extractor", "max_audio_seconds", "600", "`max_audio_seconds` must be a positive number of seconds or null (no limit), got '600'"),
        ("feature_extractor", "max_audio_seconds", -1, "`max_audio_seconds` must be a positive number of seconds or null (no limit), got -1"),
    ],
)
def test_r2_case9_processor_config_values_are_refused_at_load(saved, tmp_path, section, key, value, message):
    import tracemalloc

    from transformers import AutoProcessor

    def edit(config):
        (config if section == "processor" else config["feature_extractor"])[key] = value

    folder = _edited_copy(saved, tmp_path, edit, "processor_config.json")
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=re_escape(message)):
            AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20  # refused before anything of the value's size is allocated


def test_r2_case11_max_target_length_must_be_positive(tiny):
    _, processor = tiny
    prompt = processor.format_prompt("Describe.")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=re_escape(f"`max_target_length` must be an integer from 1 to 2147483647, got {bad!r}")):
            processor(text=prompt, audio=_tone(1.0), sampling_rate=SR, text_target="an answer", max_target_length=bad)
    one = processor(text=prompt, audio=_tone(1.0), sampling_rate=SR, text_target="an answer", max_target_length=1)
    assert one["labels"][0, -1].item() == processor.tokenizer.eos_token_id and (one["labels"][0] != -100).sum() == 1


@pytest.mark.parametrize("key, value", [("num_beams", 200000), ("num_beams", 0)])
def test_r2_case9_beam_counts_are_bounded_before_generating(saved, tmp_path, tiny, key, value):
    from transformers import AutoModel

    folder = _edited_copy(saved, tmp_path, lambda generation: generation.update({key: value}), "generation_config.json")
    _, processor = tiny
    inputs = processor(text=processor.format_prompt("Describe."), audio=_tone(1.0), sampling_rate=SR)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=re_escape(f"`{key}` must be an integer from 1 to 256 (each beam holds its own cache), got {value}")):
        model.generate(**inputs, max_new_tokens=2)
    sampled = dict(do_sample=True, num_beams=1, num_return_sequences=10**6)
    with pytest.raises(ValueError, match=re_escape("`num_return_sequences` must be an integer from 1 to 256 (each beam holds its own cache), got 1000000")):
        model.generate(**inputs, max_new_tokens=2, **sampled)


def test_r2_case10_integer_weights_in_model_safetensors_are_refused_at_load(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    folder = tmp_path / "int"
    shutil.copytree(saved, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.speech_llama_proj.weight"] = weights["model.speech_llama_proj.weight"].to(torch.int64)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    expected = (
        "Weights that must be floating point are stored as integers: "
        f"['model.speech_llama_proj.weight (I64) in {folder / 'model.safetensors'}']"
    )
    with pytest.raises(ValueError, match=re_escape(expected)):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def _r2_nan_row(key: str):
    def edit(inputs):
        inputs[key][1, 0, 0] = float("nan")

    return edit


def _r2_zero_row(key: str, row: int):
    def edit(inputs):
        inputs[key][row] = 0

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_r2_nan_row("input_features"), "`input_features` holds NaN or inf values in segment row(s) [1]"),
        (_r2_nan_row("input_values"), "`input_values` holds NaN or inf values in segment row(s) [1]"),
        (_r2_zero_row("input_values_mask", 1), "`input_values_mask` row 1 marks no audio frame"),
        (_r2_zero_row("attention_mask", 0), "`attention_mask` row 0 marks no token (rows: [0])"),
    ],
    ids=["nan-features", "nan-values", "empty-audio-mask-row", "empty-attention-row"],
)
def test_r2_case10_case11_broken_batch_rows_are_named_before_generating(tiny, edit, message):
    model, processor = tiny
    prompts = [processor.format_prompt("A."), processor.format_prompt("A longer one.")]
    inputs = processor(text=prompts, audio=[_tone(1.0), _tone(2.0)], sampling_rate=SR)
    edit(inputs)
    with pytest.raises(ValueError, match=re_escape(message)):
        model.generate(**inputs, max_new_tokens=2)
    if "attention_mask" not in message:  # the audio checks hold in the forward (training, scoring) too
        with pytest.raises(ValueError, match=re_escape(message)):
            model(**inputs)


def test_r2_case9_features_of_another_mel_size_name_the_setting(tiny):
    model, processor = tiny
    inputs = processor(text=processor.format_prompt("A."), audio=_tone(1.0), sampling_rate=SR)
    inputs["input_features"] = inputs["input_features"][:, :64]
    with pytest.raises(ValueError, match=re_escape("this model reads 80 mel bins per frame: the processor's `feature_size` must be 80")):
        model(**inputs)
    inputs = processor(text=processor.format_prompt("A."), audio=_tone(1.0), sampling_rate=SR)
    inputs["input_values"] = inputs["input_values"][..., :80]
    with pytest.raises(ValueError, match=re_escape("the processor's `beats_num_mel_bins` must be 128")):
        model(**inputs)


@pytest.mark.parametrize("key", ["input_ids", "input_features", "attention_mask"])
def test_r2_case11_meta_device_inputs_are_named(tiny, key):
    model, processor = tiny
    inputs = processor(text=processor.format_prompt("A."), audio=_tone(1.0), sampling_rate=SR)
    inputs[key] = inputs[key].to("meta")
    with pytest.raises(ValueError, match=re_escape(f"input `{key}` is on the meta device")):
        model.generate(**inputs, max_new_tokens=2)
    if key == "input_features":
        audio = {k: inputs[k] for k in ("input_features", "input_values", "input_values_mask")}
        with pytest.raises(ValueError, match=re_escape("input `input_features` is on the meta device")):
            model.get_audio_features(**audio)


def test_r2_case11_missing_tokenizer_json_is_named_at_load(saved, tmp_path):
    import shutil

    from transformers import AutoProcessor

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(saved, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=re_escape(f"{folder} has no tokenizer.json (nor tokenizer.model)")):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def test_r2_case11_raw_pickle_is_named_for_what_it_is(r2_release, caplog, capsys):
    import pickle

    from salmonn.conversion.convert_beats import main as convert_beats

    raw = r2_release / "salmonn.pth"
    state = torch.load(raw, weights_only=True)
    with open(raw, "wb") as handle:
        pickle.dump(state, handle)
    text = _r2_convert_fails(r2_release, caplog)
    assert (
        f"SALMONN checkpoint {raw} is a raw Python pickle (as pickle.dump writes), not a torch.save checkpoint: only "
        "torch.save zip checkpoints are read, with torch.load(weights_only=True)"
    ) in text
    with open(r2_release / "beats.pt", "wb") as handle:
        pickle.dump({"cfg": {}, "model": {}}, handle)
    assert convert_beats(["--beats", str(r2_release / "beats.pt"), "--output", str(r2_release.parent / "b")]) == 1
    assert f"BEATs checkpoint {r2_release / 'beats.pt'} is a raw Python pickle" in capsys.readouterr().err


def test_r2_case11_symlink_loop_is_named(tiny, r2_release, caplog, tmp_path):
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    _, processor = tiny
    with pytest.raises(ValueError, match=re_escape(f"audio[0]: audio file {str(loop)!r} is a symlink loop")):
        processor(text=processor.format_prompt("A."), audio=str(loop))
    checkpoint = r2_release / "salmonn.pth"
    checkpoint.unlink()
    checkpoint.symlink_to(checkpoint)
    assert f"SALMONN checkpoint {checkpoint} is a symlink loop" in _r2_convert_fails(r2_release, caplog)


# -- QA pass on issues 19/20: salmonn-infer --overwrite_output_dir never replaces an input or a file not its own ------


@pytest.mark.parametrize("target", ["the audio", "the manifest", "a symlink to another wav", "notes"])
def test_qa_infer_overwrite_refuses_an_input_or_a_file_not_its_own(tmp_path, caplog, target):
    from salmonn.inference.infer import main

    clip = _wav(tmp_path / "clip.wav", 1.0)
    other = _wav(tmp_path / "other.wav", 0.5)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"audio": "clip.wav", "id": "u0"}) + "\n")
    (tmp_path / "link.wav").symlink_to(other)
    (tmp_path / "notes.txt").write_text("my notes\n")
    output, inputs, message = {
        "the audio": (clip, [str(clip)], f"--output {str(clip)!r} is the input {str(clip)!r} of this run"),
        "the manifest": (manifest, [str(manifest)], f"--output {str(manifest)!r} is the input {str(manifest)!r}"),
        "a symlink to another wav": (tmp_path / "link.wav", [str(clip)], "was not written by salmonn-infer (its first line"),
        "notes": (tmp_path / "notes.txt", [str(clip)], "replaces only salmonn-infer's own output"),
    }[target]
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with caplog.at_level(logging.ERROR):
        code = main(["--model", str(tmp_path / "no-model"), "--output", str(output), "--overwrite", "--no-progress", *inputs])
    assert code == 2 and message in caplog.text
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-1"], "--seed must be from 0 to 2**32 - 1 (numpy's range), got -1"),
        (["--seed", str(2**32)], f"--seed must be from 0 to 2**32 - 1 (numpy's range), got {2**32}"),
        (["--num_beams", "257"], "--num_beams must be at most 256 (each beam holds its own cache), got 257"),
        (["--do_sample", "--temperature", "inf"], "--temperature must be a positive finite number, got inf"),
    ],
)
def test_qa_infer_numeric_flags_out_of_range_are_refused_before_loading(tmp_path, caplog, flags, message):
    output = tmp_path / "out.jsonl"
    with caplog.at_level(logging.ERROR):
        assert _infer(tmp_path, output, *flags) == 2
    assert message in caplog.text and not output.exists()


def test_qa_infer_records_a_local_model_by_its_absolute_path(tmp_path, caplog, monkeypatch):
    from salmonn.inference.infer import main

    clip = _wav(tmp_path / "clip.wav", 1.0)
    (tmp_path / "model").mkdir()
    (tmp_path / "elsewhere" / "model").mkdir(parents=True)
    output = tmp_path / "out.jsonl"
    settings = {"generation": {}, "lora_scaling": None, "engine": "transformers"}
    record = {"id": str(clip), "audio": str(clip), "prompt": "Please describe the audio in detail.", "answer": "a tone"}
    content = json.dumps({**record, "model": str((tmp_path / "model").resolve()), "settings": settings}) + "\n"
    output.write_text(content)
    monkeypatch.chdir(tmp_path)
    # The same folder spelled relatively resumes (nothing left to answer, nothing loaded) ...
    assert main(["--model", "./model/", "--output", str(output), "--no-progress", str(clip)]) == 0
    # ... and `model` from another folder is another model: refused, not mixed.
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level(logging.ERROR):
        assert main(["--model", "model", "--output", str(output), "--no-progress", str(clip)]) == 2
    assert f"not {str((tmp_path / 'elsewhere' / 'model').resolve())!r}; mixing them would be silent" in caplog.text
    assert output.read_text() == content


@pytest.mark.parametrize("name", ["predictions.jsonl", "results.json"])
def test_qa_eval_refuses_a_manifest_that_is_one_of_its_output_files(tmp_path, capsys, name):
    from salmonn.evaluation.evaluate import main

    out = tmp_path / "out"
    out.mkdir()
    manifest = out / name
    row = {"id": "u0", "audio": "u0.wav", "text": "hello"}
    manifest.write_text(json.dumps(row if name.endswith(".jsonl") else [row]) + "\n")  # results.json: a JSON list
    before = manifest.read_bytes()
    argv = ["--model_name_or_path", "m", "--task", "asr", "--test_file", str(manifest), "--output_dir", str(out) + "/"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--overwrite_output_dir", "--disable_tqdm"])
    assert exit_info.value.code == 2
    assert f"--test_file {manifest} is {out / name}, a file salmonn-eval writes in --output_dir" in capsys.readouterr().err
    assert manifest.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [name]


def test_qa_empty_manifest_and_a_folder_named_as_manifest_are_named(tmp_path, caplog, capsys):
    from salmonn.evaluation.evaluate import main as eval_main

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\xef\xbb\xbf\r\n\n")
    output = tmp_path / "out.jsonl"
    with caplog.at_level(logging.ERROR):
        assert _infer(tmp_path, output, "--test_file", str(empty)) == 2
    assert f"manifest {str(empty)!r} holds no items" in caplog.text and not output.exists()
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(SystemExit):
        eval_main(["--model", "m", "--task", "asr", "--test_file", str(folder), "--output_dir", str(tmp_path / "ev")])
    assert f"--test_file {folder} is a folder; give a JSONL, CSV, TSV or JSON manifest file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_train_epochs", "0"], "--num_train_epochs must be a positive finite number, got 0.0"),
        (["--num_train_epochs", "nan"], "--num_train_epochs must be a positive finite number, got nan"),
        (["--max_steps", "0"], "--max_steps must be positive (or -1 to train for --num_train_epochs), got 0"),
        (["--max_steps", "1", "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    ],
)
def test_qa_train_length_of_no_step_is_refused_before_loading(tmp_path, capsys, flags, message):
    from salmonn.training.train import main

    setup = {"base": tmp_path / "no-model", "manifest": tmp_path / "no-data.jsonl"}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(_train_args(setup, out, *flags))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_qa_convert_max_shard_size_zero_is_refused(tmp_path, caplog):
    from salmonn.conversion.convert_salmonn import main
    from tests.utils import fixture_a_convert_args

    output = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert main(fixture_a_convert_args(output, "--max-shard-size", "0")) != 0
    assert "--max-shard-size '0': must be positive (0 would write one file per tensor)" in caplog.text
    assert not output.exists()


@pytest.mark.parametrize(
    "key, value", [("feature_size", 80.0), ("beats_num_mel_bins", 128.0), ("sampling_rate", True), ("n_fft", "400")]
)
def test_qa_processor_config_sizes_of_another_type_are_named_at_load(saved, tmp_path, key, value):
    from transformers import AutoProcessor

    def edit(config):
        config["feature_extractor"][key] = value

    folder = _edited_copy(saved, tmp_path, edit, "processor_config.json")
    with pytest.raises(ValueError, match=re_escape(f"`{key}` must be a positive integer, got {value!r}")):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def test_qa_infer_output_dash_is_stdout_not_a_file(tmp_path, monkeypatch):
    from salmonn.inference.infer import output_path, build_parser

    monkeypatch.chdir(tmp_path)
    args, infer_args, _, _, _ = build_parser().parse_args_into_dataclasses(
        args=["--model", "m", "--output", "-"], return_remaining_strings=True, look_for_args_file=False
    )
    assert output_path(args, infer_args) is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_qa_eval_limit_below_one_is_refused_before_writing(tmp_path, capsys, limit):
    from salmonn.evaluation.evaluate import main

    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": "hi"}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--task", "asr", "--test_file", str(manifest), "--output_dir", str(out), "--limit", limit])
    assert exit_info.value.code == 2 and f"--limit must be at least 1, got {limit}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--max_train_samples", "--max_eval_samples"])
def test_qa_train_sample_limits_below_one_are_refused(tmp_path, capsys, flag):
    from salmonn.training.train import main

    setup = {"base": tmp_path / "no-model", "manifest": tmp_path / "no-data.jsonl"}
    with pytest.raises(SystemExit) as exit_info:
        main(_train_args(setup, tmp_path / "out", "--max_steps", "1", flag, "-1"))
    assert exit_info.value.code == 2 and f"{flag} must be at least 1, got -1" in capsys.readouterr().err


def test_qa_infer_input_symlink_loop_and_broken_symlink_are_named(tmp_path, caplog):
    from salmonn.inference.infer import main

    loop, broken = tmp_path / "loop.wav", tmp_path / "broken.wav"
    loop.symlink_to(loop)
    broken.symlink_to(tmp_path / "gone.wav")
    for given, message in [(loop, "is a symlink loop (it resolves to itself)"), (broken, "is a broken symlink (to ")]:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o.jsonl"), str(given)]) == 2
        assert f"INPUT {str(given)!r} {message}" in caplog.text and not (tmp_path / "o.jsonl").exists()


def test_qa_demo_save_dir_never_replaces_a_users_files(tmp_path, caplog):
    from salmonn.inference.demo import main

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("my own config\n")
    clip = _wav(tmp_path / "clip.wav", 1.0)
    with caplog.at_level(logging.ERROR):
        assert main(["--save_dir", str(folder)]) == 2
        assert main(["--save_dir", str(clip)]) == 2
    assert f"--save_dir {str(folder)!r} is not empty and was not written by salmonn-demo" in caplog.text
    assert f"--save_dir {str(clip)!r} is a file, not a folder" in caplog.text
    assert [p.name for p in folder.iterdir()] == ["config.json"] and (folder / "config.json").read_text() == "my own config\n"


# -- generation config types and the LoRA scaling bound (lead's pass) ---------------------------------------------


@pytest.mark.parametrize(
    "key, value", [("max_new_tokens", "abc"), ("num_beams", [4]), ("temperature", {"t": 1})]
)
def test_generation_config_value_of_the_wrong_type_is_named_at_load(saved, tmp_path, key, value):
    from modeling_salmonn.modeling_salmonn import SalmonnForConditionalGeneration

    folder = _edited_copy(saved, tmp_path, lambda config: config.update({key: value}), name="generation_config.json")
    with pytest.raises(ValueError) as error:
        SalmonnForConditionalGeneration.from_pretrained(folder)
    assert f"{folder / 'generation_config.json'}: {key!r} = {value!r} is not a valid generation setting" in str(error.value)


def test_generation_config_that_is_not_json_is_named_at_load(saved, tmp_path):
    import shutil

    from modeling_salmonn.modeling_salmonn import SalmonnForConditionalGeneration

    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        SalmonnForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("value", [1e30, 1000.5, -0.5])
def test_lora_scaling_outside_0_to_1000_is_refused(tiny, value):
    from salmonn.inference.engine import check_lora_scaling

    model, _ = tiny
    before = model.lora_scaling
    with pytest.raises(ValueError, match=r"`set_lora_scaling` expects a number from 0 to 1000"):
        model.set_lora_scaling(value)
    with pytest.raises(ValueError, match=r"lora_scaling\) must be a number from 0 to 1000"):
        check_lora_scaling(value)
    assert model.lora_scaling == before
    assert check_lora_scaling(1000.0) == 1000.0


# -- QA pass on issue 19: --overwrite replaces only an earlier output (a folder holding config.json) ----------------


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_qa_overwrite_never_replaces_a_users_folder_without_config_json(tmp_path, caplog, capsys):
    from salmonn.conversion.convert_beats import main as beats_main
    from salmonn.conversion.convert_salmonn import main as convert_main
    from salmonn.training.build_demo_model import main as build_main
    from salmonn.training.export import main as export_main
    from tests.utils import FIXTURE_A, fixture_a_convert_args

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("four years of work\n")
    before = _snapshot(tmp_path)
    expected = (
        f"Output folder {docs} holds thesis.txt but no config.json, so it is not an earlier output of this command and "
        "--overwrite does not replace it; remove it or choose another folder"
    )
    with caplog.at_level(logging.ERROR):
        assert convert_main(fixture_a_convert_args(docs, "--overwrite")) == 1
        assert build_main(["--output_dir", str(docs), "--speech", "false"]) == 2  # its --overwrite is on by default
        export = ["--model_name_or_path", str(tmp_path / "base"), "--export", str(tmp_path / "export.safetensors")]
        assert export_main([*export, "--output_dir", str(docs), "--overwrite"]) == 2  # refused before loading them
    assert caplog.text.count(expected) == 3
    assert beats_main(["--beats", str(FIXTURE_A / "beats.pt"), "--output", str(docs), "--overwrite"]) == 1
    assert f"salmonn-convert-beats: error: {expected}" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # byte-identical, and no temporary folder next to it


@pytest.mark.parametrize("value,shown", [("nan", "nan"), ("inf", "inf"), ("-1", "-1.0")])
def test_qa_max_grad_norm_not_finite_or_negative_is_refused(train_setup, tmp_path, capsys, value, shown):
    from salmonn.training.train import main

    out = tmp_path / "out"
    assert main(_train_args(train_setup, out, "--max_steps", "1", "--max_grad_norm", value)) == 2
    assert f"--max_grad_norm must be a finite number >= 0, got {shown}" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_audio_hash_of_a_pipe_in_the_files_place_returns_at_once(tmp_path):
    import threading

    from salmonn.audio_hash import audio_hash

    pipe = tmp_path / "clip.wav"
    os.mkfifo(pipe)  # an answered file replaced by a FIFO: opening it for reading would wait for a writer forever
    result = []
    worker = threading.Thread(target=lambda: result.append(audio_hash([str(pipe)])), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert result == [None]
    assert audio_hash([str(_wav(tmp_path / "real.wav", 0.5))]).startswith("blake2b:")


def test_a_few_frames_of_stereo_are_samples_by_channels_not_transposed(tiny):
    _, processor = tiny
    prompt = processor.format_prompt("Describe.")
    one_frame = processor(text=prompt, audio=np.array([[0.25, -0.5]]), sampling_rate=SR)  # one stereo frame
    alone = processor(text=prompt, audio=np.array([0.25]), sampling_rate=SR)  # its channel 0
    assert torch.equal(one_frame["input_features"], alone["input_features"])
    with pytest.raises(ValueError, match=r"probably \[channels, samples\]; transpose it"):
        processor(text=prompt, audio=np.zeros((2, 16000)), sampling_rate=SR)
