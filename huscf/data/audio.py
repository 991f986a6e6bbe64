"""Audio as images: fixed-size log-mel spectrograms of short recordings, and back to audio.

A recording (8 kHz mono) is trimmed of leading and trailing silence, centred in a window of
``SPEC.length`` samples (zero-padded or cropped), and turned into a ``SPEC.n_mels`` x ``SPEC.frames``
log-mel power spectrogram (librosa's mel filters), in dB relative to the clip's loudest bin,
clipped to ``[-SPEC.top_db, 0]`` and stored as uint8 (0 = -top_db dB, 255 = 0 dB), low frequencies
at the bottom row. 28 x 28 by default, so the spoken digits train with the 28x28 cGAN unchanged.

``images_to_waves`` inverts it: dB -> power -> Griffin-Lim through the pseudo-inverse of the mel
filters (``mel_to_stft``, then a seeded ``griffinlim``), so generated spectrograms can be listened to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from huscf.errors import HuscfError


@dataclass(frozen=True)
class SpectrogramSpec:
    sample_rate: int = 8000
    n_mels: int = 28
    frames: int = 28
    hop: int = 288  # frames x hop = 8064 samples: about one second, the length of a spoken digit
    n_fft: int = 1024
    top_db: float = 80.0
    trim_db: float = 30.0  # silence threshold for trimming, below the clip's peak
    griffin_lim_iters: int = 64

    @property
    def length(self) -> int:
        """Samples per window: ``frames`` centred STFT frames."""
        return self.hop * (self.frames - 1)


SPEC = SpectrogramSpec()


def _librosa():
    try:
        import librosa
    except ImportError:
        raise HuscfError("audio domains need librosa: pip install 'huscf[audio]' (or pip install librosa)") from None
    return librosa


def settings_id(spec: SpectrogramSpec = SPEC) -> str:
    """Everything besides the audio that the images depend on: the settings and librosa's version."""
    return f"{spec}|librosa {_librosa().__version__}"


def _window(wave: np.ndarray, spec: SpectrogramSpec) -> np.ndarray:
    librosa = _librosa()
    y = np.asarray(wave, dtype=np.float32)
    if np.issubdtype(np.asarray(wave).dtype, np.integer):
        y = y / 32768.0
    if len(y) and np.abs(y).max() > 0:
        y, _ = librosa.effects.trim(y, top_db=spec.trim_db)
    out = np.zeros(spec.length, dtype=np.float32)
    if len(y) >= spec.length:
        start = (len(y) - spec.length) // 2
        out[:] = y[start:start + spec.length]
    else:
        start = (spec.length - len(y)) // 2
        out[start:start + len(y)] = y
    return out


def waves_to_images(waves, spec: SpectrogramSpec = SPEC) -> np.ndarray:
    """Recordings (each 1-D, int16 or float in [-1, 1]) -> uint8 images (N, 1, n_mels, frames)."""
    librosa = _librosa()
    out = np.empty((len(waves), 1, spec.n_mels, spec.frames), dtype=np.uint8)
    for i, w in enumerate(waves):
        m = librosa.feature.melspectrogram(y=_window(w, spec), sr=spec.sample_rate, n_fft=spec.n_fft,
                                           hop_length=spec.hop, n_mels=spec.n_mels, power=2.0)
        db = librosa.power_to_db(m, ref=np.max, top_db=spec.top_db)  # (n_mels, frames) in [-top_db, 0]
        out[i, 0] = np.round((db[::-1] + spec.top_db) / spec.top_db * 255).clip(0, 255).astype(np.uint8)
    return out


def images_to_waves(images: np.ndarray, spec: SpectrogramSpec = SPEC) -> np.ndarray:
    """Spectrogram images (N, 1, n_mels, frames): uint8 0..255, or float in [-1, 1] as the
    generator makes them -> float32 audio (N, length), each peak-normalised to 0.9. Griffin-Lim
    starts from a seeded random phase, so the same images always give the same audio."""
    librosa = _librosa()
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (1, spec.n_mels, spec.frames):
        raise HuscfError(f"spectrogram images must be (N, 1, {spec.n_mels}, {spec.frames}), got {x.shape}")
    unit = (x + 1) / 2 if np.asarray(images).dtype != np.uint8 else x / 255.0
    waves = np.zeros((len(x), spec.length), dtype=np.float32)
    for i, img in enumerate(unit[:, 0]):
        power = librosa.db_to_power(img[::-1] * spec.top_db - spec.top_db)
        stft = librosa.feature.inverse.mel_to_stft(power, sr=spec.sample_rate, n_fft=spec.n_fft)
        y = librosa.griffinlim(stft, n_iter=spec.griffin_lim_iters, hop_length=spec.hop, length=spec.length,
                               random_state=0)
        peak = np.abs(y).max()
        waves[i] = y / peak * 0.9 if peak > 0 else y
    return waves


def write_wav(path: Path, wave: np.ndarray, spec: SpectrogramSpec = SPEC) -> None:
    """One float waveform in [-1, 1] -> a 16-bit mono WAV file."""
    from scipy.io import wavfile

    wavfile.write(str(path), spec.sample_rate, (np.clip(wave, -1, 1) * 32767).astype(np.int16))
