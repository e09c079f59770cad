"""
Synthetic audio for tests, the learning check and the built-in demo model: tones, noise, chirps and spoken words
(`espeak-ng`, when it is on PATH). Every clip is a pure function of its class and seed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _fade(audio: np.ndarray, rate: int, seconds: float = 0.01) -> np.ndarray:
    n = min(int(rate * seconds), len(audio) // 2)
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n)
        audio[:n] *= ramp
        audio[-n:] *= ramp[::-1]
    return audio


def tone(frequency: float, seconds: float, rate: int = SAMPLING_RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return _fade(amplitude * np.sin(2 * np.pi * frequency * t), rate)


def chirp(start_hz: float, end_hz: float, seconds: float, rate: int = SAMPLING_RATE, amplitude: float = 0.5) -> np.ndarray:
    """A linear sweep; the phase is the integral of the instantaneous frequency."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (start_hz * t + (end_hz - start_hz) * t**2 / (2 * seconds))
    return _fade(amplitude * np.sin(phase), rate)


def noise(seconds: float, rate: int = SAMPLING_RATE, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _fade(np.clip(amplitude * rng.standard_normal(int(seconds * rate)), -1.0, 1.0), rate)


def speak(text: str, rate: int = SAMPLING_RATE, speed: int = 150, pitch: int = 50, voice: str = "en") -> np.ndarray:
    """Speech from espeak-ng (22.05 kHz), resampled to `rate`."""
    from salmonn.audio import read_audio, resample

    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", wav, text]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"espeak-ng failed ({result.returncode}): {result.stderr.strip()}")
        audio, file_rate = read_audio(wav)
    audio = resample(audio, file_rate, rate)
    peak = float(np.max(np.abs(audio))) or 1.0
    return 0.6 * audio / peak


@dataclass(frozen=True)
class SoundClass:
    """One class of synthetic clips and the answer a trained model should give for it."""

    name: str
    answer: str
    kind: str  # "tone", "chirp", "noise" or "speech"

    @property
    def cue(self) -> str:
        """A word for the class (what a text-only stand-in LLM is taught to describe)."""
        return self.kind


# A few classes with distinct answers; the spoken one (a random word in a random voice) needs espeak-ng.
SOUND_CLASSES: tuple[SoundClass, ...] = (
    SoundClass("tone", "A pure tone plays steadily.", "tone"),
    SoundClass("chirp", "A rising chirp sweeps upward.", "chirp"),
    SoundClass("noise", "White noise hisses in the background.", "noise"),
    SoundClass("speech", "Someone is speaking.", "speech"),
)


SPOKEN_WORDS = ("hello", "seven", "yes", "no", "water", "morning", "thank you", "one two three", "good night", "listen")


def available_classes(include_speech: bool | None = None) -> list[SoundClass]:
    if include_speech is None:
        include_speech = espeak_available()
    return [c for c in SOUND_CLASSES if c.kind != "speech" or include_speech]


def make_clip(sound: SoundClass | str, seed: int = 0, rate: int = SAMPLING_RATE) -> np.ndarray:
    """A clip of `sound` with seed-dependent pitch, length, loudness, timing and background."""
    if isinstance(sound, str):
        matches = [c for c in SOUND_CLASSES if c.name == sound]
        if not matches:
            raise ValueError(f"Unknown sound class {sound!r}; known: {[c.name for c in SOUND_CLASSES]}")
        sound = matches[0]
    rng = np.random.default_rng([seed, sum(map(ord, sound.name))])
    seconds = float(rng.uniform(0.8, 2.5))
    amplitude = float(rng.uniform(0.25, 0.6))
    if sound.kind == "tone":
        core = tone(float(rng.uniform(100, 200)), seconds, rate, amplitude)
    elif sound.kind == "chirp":
        start = float(rng.uniform(280, 450))
        core = chirp(start, start * float(rng.uniform(6.0, 12.0)), seconds, rate, amplitude)
    elif sound.kind == "noise":
        core = noise(seconds, rate, amplitude * 0.3, seed=int(rng.integers(2**31)))
    elif sound.kind == "speech":
        word = SPOKEN_WORDS[int(rng.integers(len(SPOKEN_WORDS)))]
        voice = ("en", "en-us", "en-gb-x-rp")[int(rng.integers(3))]
        core = speak(word, rate, speed=int(rng.integers(120, 190)), pitch=int(rng.integers(25, 75)), voice=voice)
        core = core * amplitude / 0.6
    else:
        raise ValueError(f"Unknown sound kind {sound.kind!r}")
    lead = np.zeros(int(rng.uniform(0.0, 0.4) * rate))
    clip = np.concatenate([lead, core, np.zeros(int(rng.uniform(0.0, 0.3) * rate))])
    # Half of the clips get a faint background hiss, the others keep digital silence around the sound.
    if rng.random() < 0.5:
        clip += 10 ** rng.uniform(-3.3, -2.0) * rng.standard_normal(len(clip))
    return np.clip(clip, -1.0, 1.0)


def write_dataset(
    output_dir: str | os.PathLike,
    clips_per_class: int,
    classes: list[SoundClass] | None = None,
    seed: int = 0,
    task: str = "audiocaption",
    manifest_name: str = "annotation.json",
) -> Path:
    """Writes 16 kHz wavs and an annotation file in the original format; returns the manifest path."""
    import soundfile

    classes = available_classes() if classes is None else classes
    output_dir = Path(output_dir)
    (output_dir / "audio").mkdir(parents=True, exist_ok=True)
    annotation = []
    for sound in classes:
        for k in range(clips_per_class):
            clip_seed = seed * 100_003 + k
            relative = f"audio/{sound.name}_{seed}_{k}.wav"
            soundfile.write(output_dir / relative, make_clip(sound, clip_seed), SAMPLING_RATE, subtype="PCM_16")
            annotation.append({"path": relative, "text": sound.answer, "task": task})
    manifest = output_dir / manifest_name
    manifest.write_text(json.dumps({"annotation": annotation}, indent=1), encoding="utf-8")
    logger.info("Wrote %d synthetic clips (%d classes) to %s", len(annotation), len(classes), output_dir)
    return manifest
