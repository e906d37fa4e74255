import numpy as np
import pytest
import soundfile as sf

from fastser.audio import AudioError, load


def tone(sr, seconds=0.5, f=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return 0.5 * np.sin(2 * np.pi * f * t)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_formats_load_as_float_in_unit_range(tmp_path, subtype):
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, tone(16000), 16000, subtype=subtype)
    y, sr = load(path)
    assert sr == 16000 and y.dtype == np.float32 and y.shape == (8000,)
    np.testing.assert_allclose(y, tone(16000), atol=1e-4)


def test_stereo_mixdown_and_keep_channels(tmp_path):
    left, right = tone(16000), tone(16000, f=1000.0)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    y, _ = load(tmp_path / "s.wav")
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)
    both, _ = load(tmp_path / "s.wav", mono=False)
    assert both.shape == (2, 8000)


def test_resampling_preserves_a_tone(tmp_path):
    sf.write(tmp_path / "48k.wav", tone(48000, 1.0, 1000.0), 48000, subtype="FLOAT")
    y, sr = load(tmp_path / "48k.wav", sr=16000)
    assert sr == 16000 and y.shape == (16000,)
    mid = slice(1000, 15000)  # away from the filter's edge transients
    np.testing.assert_allclose(y[mid], tone(16000, 1.0, 1000.0)[mid], atol=2e-3)
    native, sr = load(tmp_path / "48k.wav", sr=None)
    assert sr == 48000 and native.shape == (48000,)


def test_bad_files_name_the_file_and_the_reason(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: empty file"):
        load(empty)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    with pytest.raises(AudioError, match="notes.wav: not a readable audio file"):
        load(text)
    with pytest.raises(AudioError, match="missing.wav: no such file"):
        load(tmp_path / "missing.wav")
    good = tmp_path / "good.wav"
    sf.write(good, tone(16000), 16000, subtype="PCM_16")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:44])  # header only: no samples
    with pytest.raises(AudioError, match="truncated.wav"):
        load(truncated)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:8000])  # header promises more frames than the file holds
    with pytest.raises(AudioError, match="cut.wav"):
        load(cut)
