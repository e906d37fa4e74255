"""Tiny corpora in each corpus's real folder layout and naming code, with bad files among them."""

from pathlib import Path

import numpy as np
import soundfile as sf


def write_wav(path: Path, seconds: float = 0.3, sr: int = 16000, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(
        path,
        0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.01 * rng.standard_normal(t.size),
        sr,
        subtype="PCM_16",
    )


def add_bad_files(folder: Path, names):
    """An empty file, a text file and a truncated WAV, all with well-formed names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_bytes(b"")
    (folder / names[1]).write_text("not audio at all")
    write_wav(folder / names[2])
    data = (folder / names[2]).read_bytes()
    (folder / names[2]).write_bytes(data[: len(data) // 2])


def make_emodb(root: Path) -> dict:
    expected = {}
    for i, (spk, emo) in enumerate(
        [("03", "W"), ("03", "N"), ("08", "T"), ("08", "F"), ("10", "A"), ("16", "L"), ("16", "E")]
    ):
        name = f"{spk}a0{i % 5 + 1}{emo}a"
        write_wav(root / "wav" / f"{name}.wav", seed=i)
        expected[name] = (spk, emo)
    (root / "wav" / "readme.wav").write_bytes(b"RIFF")  # name does not parse
    add_bad_files(root / "wav", ["09a01Wa.wav", "09a02Na.wav", "09a03Ta.wav"])
    return expected


def make_ravdess(root: Path) -> dict:
    expected = {}
    for actor in (1, 2, 3, 4):
        for j, emo in enumerate(("01", "05", "08")):
            name = f"03-01-{emo}-0{1 + j % 2}-01-01-{actor:02d}"
            write_wav(root / f"Actor_{actor:02d}" / f"{name}.wav", seed=actor * 10 + j)
            expected[name] = (f"Actor_{actor:02d}", emo)
        write_wav(root / f"Actor_{actor:02d}" / f"02-01-05-01-01-01-{actor:02d}.wav")  # video-only: not speech audio
        write_wav(root / f"Actor_{actor:02d}" / f"03-02-05-01-01-01-{actor:02d}.wav")  # song
    (root / "Actor_01" / "notes.wav").write_bytes(b"")
    add_bad_files(
        root / "Actor_02", ["03-01-03-01-01-02-02.wav", "03-01-04-01-01-02-02.wav", "03-01-06-01-01-02-02.wav"]
    )
    return expected


def make_cremad(root: Path) -> dict:
    expected = {}
    for actor in (1001, 1002, 1091):
        for j, (sent, emo, lvl) in enumerate([("DFA", "ANG", "XX"), ("IEO", "HAP", "HI"), ("TIE", "SAD", "LO")]):
            name = f"{actor}_{sent}_{emo}_{lvl}"
            write_wav(root / "AudioWAV" / f"{name}.wav", seed=actor + j)
            expected[name] = (str(actor), emo)
    write_wav(root / "AudioWAV" / "1001_XYZ_ANG_XX.wav")  # unknown sentence code
    add_bad_files(root / "AudioWAV", ["1002_ITS_FEA_XX.wav", "1002_ITH_DIS_XX.wav", "1002_TAI_NEU_XX.wav"])
    return expected


def make_tess(root: Path) -> dict:
    expected = {}
    for spk in ("OAF", "YAF"):
        for j, emo in enumerate(("angry", "ps", "neutral", "fear")):
            folder = f"{spk}_{'pleasant_surprised' if emo == 'ps' else emo}"
            name = f"{spk}_back_{emo}" if j % 2 else f"{spk}_dog_{emo}"
            write_wav(root / folder / f"{name}.wav", seed=j)
            expected[name] = (spk, emo)
    write_wav(root / "OAF_angry" / "OAF_back_furious.wav")  # not a TESS emotion
    add_bad_files(root / "YAF_sad", ["YAF_bar_sad.wav", "YAF_bath_sad.wav", "YAF_bean_sad.wav"])
    return expected


def make_emovo(root: Path) -> dict:
    expected = {}
    for actor in ("f1", "m2", "m3"):
        for j, (emo, sentence) in enumerate((("rab", "b1"), ("sor", "n5"), ("neu", "l4"))):
            name = f"{emo}-{actor}-{sentence}"
            write_wav(root / actor / f"{name}.wav", seed=j)
            expected[name] = (actor, emo)
    write_wav(root / "f1" / "xyz-f1-b1.wav")  # not an EMOVO emotion
    write_wav(root / "m2" / "rab-m2-b1-copy.wav")  # a copy beside the original
    add_bad_files(root / "m3", ["tri-m3-d1.wav", "gio-m3-d2.wav", "pau-m3-l1.wav"])
    return expected


EMO_EVAL = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\t{d}_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral;\t()

[10.0100 - 11.3925]\t{d}_M000\texc\t[3.5000, 3.5000, 3.0000]

[14.8872 - 18.0175]\t{d}_F001\thap\t[4.0000, 3.0000, 3.0000]

[19.2900 - 20.7875]\t{d}_M001\tang\t[1.5000, 4.0000, 4.0000]

[21.3257 - 24.7400]\t{d}_F002\tsad\t[2.0000, 2.0000, 2.0000]

[27.4600 - 31.4900]\t{d}_M002\tfru\t[2.0000, 3.5000, 3.5000]

[32.0000 - 33.0000]\t{d}_F003\txxx\t[2.5000, 2.5000, 2.5000]
"""


def make_iemocap(root: Path) -> dict:
    base = root / "IEMOCAP_full_release"
    expected = {}
    for s in (1, 2, 3):
        for dialog in (f"Ses0{s}F_impro01", f"Ses0{s}M_script01_1"):
            (base / f"Session{s}" / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (base / f"Session{s}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text(EMO_EVAL.format(d=dialog))
            (base / f"Session{s}" / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
            (base / f"Session{s}" / "dialog" / "transcriptions" / f"{dialog}.txt").write_text(
                f"{dialog}_F000 [006.2901-008.2357]: Excuse me.\n"
            )
            for k, utt in enumerate(["F000", "M000", "F001", "M001", "F002", "M002", "F003"]):
                write_wav(base / f"Session{s}" / "sentences" / "wav" / dialog / f"{dialog}_{utt}.wav", seed=s * 10 + k)
            for utt, label in (
                ("F000", "neutral"),
                ("M000", "happy"),
                ("F001", "happy"),
                ("M001", "angry"),
                ("F002", "sad"),
            ):
                expected[f"{dialog}_{utt}"] = (f"Ses0{s}{utt[0]}", label, f"Session{s}")
    # a bad file: listed in EmoEvaluation, present, but empty
    (base / "Session3" / "sentences" / "wav" / "Ses03F_impro01" / "Ses03F_impro01_F002.wav").write_bytes(b"")
    return expected
