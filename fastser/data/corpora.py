"""Loaders for IEMOCAP, EmoDB, RAVDESS, CREMA-D, TESS and EMOVO, from the folder layouts they ship in.

Labels and speakers come from each corpus's own naming code (never from a CSV beside it). A file
whose name does not parse is skipped and reported in `Corpus.skipped`; audio that cannot be read
is found and skipped later, when it is loaded (fastser.data.cache).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from fastser.data.base import Corpus, CorpusError, Utterance

LAYOUTS = {
    "iemocap": "IEMOCAP_full_release/Session{1..5}/dialog/EmoEvaluation/*.txt and "
    "Session{1..5}/sentences/wav/<dialog>/<utterance>.wav",
    "emodb": "wav/03a01Fa.wav (speaker, text, emotion letter W/L/E/A/F/T/N, version)",
    "ravdess": "Actor_XX/03-01-EE-II-SS-RR-AA.wav (modality-channel-emotion-intensity-statement-repetition-actor)",
    "cremad": "AudioWAV/1001_DFA_ANG_XX.wav (actor_sentence_emotion_level)",
    "tess": "OAF_angry/OAF_back_angry.wav, YAF_.../YAF_<word>_<emotion>.wav",
    "emovo": "f1/dis-f1-b1.wav (<actor>/<emotion>-<actor>-<sentence>; actors f1-f3, m1-m3)",
}


def _root(data_dir, corpus: str, marker: str) -> Path:
    """The folder that holds `marker`: data_dir itself or one level below it (an unpacked archive)."""
    if data_dir is None:
        raise CorpusError(f"--data-dir is required for {corpus}; expected layout: {LAYOUTS[corpus]}")
    root = Path(data_dir)
    if not root.is_dir():
        raise CorpusError(
            f"{corpus}: --data-dir {root} does not exist or is not a folder; expected layout: {LAYOUTS[corpus]}"
        )
    for candidate in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        if list(candidate.glob(marker)):
            return candidate
    raise CorpusError(f"{corpus}: found nothing matching {marker!r} in {root}; expected layout: {LAYOUTS[corpus]}")


def _wavs(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".wav" and p.is_file())


def _scan(root: Path, pattern: re.Pattern, code: str, build):
    """Every .wav under root whose stem matches `pattern`: build(wav, match) gives its Utterance, or
    None to leave it out quietly (not part of the task); a name that does not parse is skipped."""
    utterances, skipped = [], []
    for wav in _wavs(root):
        m = pattern.match(wav.stem)
        if m is None:
            skipped.append((str(wav), f"name does not follow {code}"))
            continue
        u = build(wav, m)
        if u is not None:
            utterances.append(u)
    return utterances, skipped


# ----------------------------------------------------------------------------- IEMOCAP

IEMOCAP_LABELS = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "excited",
    "sad": "sad",
    "ang": "angry",
    "fru": "frustrated",
    "sur": "surprised",
    "fea": "fearful",
    "dis": "disgust",
    "oth": "other",
}
IEMOCAP_4 = "neutral,happy=happy+excited,sad,angry"
_EMO_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(Ses\d\d[FM]_\S+)\s+(\w+)\s+\[")
_TRANSCRIPT = re.compile(r"^(Ses\d\d[FM]_\S+)\s+\[[^\]]*\]:\s*(.*)$")


def load_iemocap(data_dir, *, subset: str = "all", four_class: bool = True) -> Corpus:
    """subset: "all", "improvised" or "scripted". four_class: the standard task (happy + excited)."""
    if subset not in ("all", "improvised", "scripted"):
        raise ValueError(f"subset must be all, improvised or scripted, got {subset!r}")
    root = _root(data_dir, "iemocap", "Session[1-5]")
    utterances, skipped = [], []
    for session_dir in sorted(root.glob("Session[1-5]")):
        session = session_dir.name
        texts = {}
        for tr in sorted((session_dir / "dialog" / "transcriptions").glob("*.txt")):
            for line in tr.read_text(errors="replace").splitlines():
                m = _TRANSCRIPT.match(line.strip())
                if m:
                    texts[m.group(1)] = m.group(2)
        for ev in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
            for line in ev.read_text(errors="replace").splitlines():
                m = _EMO_LINE.match(line.strip())
                if not m:
                    continue
                uid, code = m.groups()
                dialog = uid.rsplit("_", 1)[0]
                kind = "improvised" if "_impro" in dialog else "scripted"
                if subset != "all" and kind != subset:
                    continue
                label = IEMOCAP_LABELS.get(code)
                if label is None:  # "xxx": no majority label
                    continue
                wav = session_dir / "sentences" / "wav" / dialog / f"{uid}.wav"
                if not wav.is_file():
                    skipped.append((str(wav), "listed in EmoEvaluation but missing"))
                    continue
                gender = uid.rsplit("_", 1)[1][0]  # who speaks: F000 / M012
                utterances.append(
                    Utterance(
                        uid=uid,
                        label=label,
                        speaker=f"{uid[:5]}{gender}",
                        path=str(wav),
                        session=session,
                        gender=gender,
                        text=texts.get(uid),
                    )
                )
    if not utterances:
        raise CorpusError(f"iemocap: no labelled utterances under {root}; expected layout: {LAYOUTS['iemocap']}")
    corpus = Corpus(
        "iemocap",
        sorted({u.label for u in utterances}, key=list(IEMOCAP_LABELS.values()).index),
        utterances,
        skipped=skipped,
        default_split="session",
    )
    return corpus.with_classes(IEMOCAP_4) if four_class else corpus


# ----------------------------------------------------------------------------- EmoDB

EMODB_LABELS = {"W": "angry", "L": "bored", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
EMODB_MALE = {"03", "10", "11", "12", "15"}
EMODB_SPEAKERS = {"03", "08", "09", "10", "11", "12", "13", "14", "15", "16"}
_EMODB = re.compile(r"^(" + "|".join(sorted(EMODB_SPEAKERS)) + r")([a-b]\d\d)([WLEAFTN])([a-z])$")


def load_emodb(data_dir) -> Corpus:
    def build(wav, m):
        spk, text, emo, _ = m.groups()
        return Utterance(
            uid=wav.stem,
            label=EMODB_LABELS[emo],
            speaker=spk,
            path=str(wav),
            gender="M" if spk in EMODB_MALE else "F",
            text=text,
        )

    utterances, skipped = _scan(
        _root(data_dir, "emodb", "**/*.wav"), _EMODB, "EmoDB's <speaker><text><emotion><version> code", build
    )
    return _finish("emodb", list(EMODB_LABELS.values()), utterances, skipped, "loso")


# ----------------------------------------------------------------------------- RAVDESS

RAVDESS_LABELS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
_RAVDESS = re.compile(r"^(0[1-3])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)$")


def load_ravdess(data_dir) -> Corpus:
    """Speech audio only (modality 03 audio-only, vocal channel 01 speech); 8 classes."""

    def build(wav, m):
        modality, channel, emo, _, statement, _, actor = m.groups()
        if modality != "03" or channel != "01":  # video files and song are not this task
            return None
        return Utterance(
            uid=wav.stem,
            label=RAVDESS_LABELS[emo],
            speaker=f"Actor_{actor}",
            path=str(wav),
            gender="M" if int(actor) % 2 else "F",
            text="Kids are talking by the door" if statement == "01" else "Dogs are sitting by the door",
        )

    utterances, skipped = _scan(
        _root(data_dir, "ravdess", "Actor_*"), _RAVDESS, "RAVDESS's MM-VC-EE-II-SS-RR-AA code", build
    )
    return _finish("ravdess", list(RAVDESS_LABELS.values()), utterances, skipped, "kfold")


# ----------------------------------------------------------------------------- CREMA-D

CREMAD_LABELS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
CREMAD_SENTENCES = {"IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI"}
_CREMAD = re.compile(
    r"^(1\d\d\d)_(" + "|".join(sorted(CREMAD_SENTENCES)) + r")_(" + "|".join(CREMAD_LABELS) + r")_(LO|MD|HI|XX|X)$"
)


def load_cremad(data_dir) -> Corpus:
    def build(wav, m):
        actor, sentence, emo, _ = m.groups()
        return Utterance(uid=wav.stem, label=CREMAD_LABELS[emo], speaker=actor, path=str(wav), text=sentence)

    utterances, skipped = _scan(
        _root(data_dir, "cremad", "**/*.wav"), _CREMAD, "CREMA-D's <actor>_<sentence>_<emotion>_<level> code", build
    )
    return _finish("cremad", list(CREMAD_LABELS.values()), utterances, skipped, "kfold")


# ----------------------------------------------------------------------------- TESS

TESS_LABELS = {
    "angry": "angry",
    "disgust": "disgust",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "ps": "surprised",
    "sad": "sad",
}
_TESS = re.compile(r"^(OAF|YAF)_([A-Za-z]+)_(" + "|".join(TESS_LABELS) + r")$", re.IGNORECASE)


def load_tess(data_dir) -> Corpus:
    """Two speakers (OAF older, YAF younger); 'ps' = pleasant surprise."""

    def build(wav, m):
        spk, word, emo = m.group(1).upper(), m.group(2), m.group(3).lower()
        return Utterance(
            uid=f"{spk}_{word}_{emo}", label=TESS_LABELS[emo], speaker=spk, path=str(wav), gender="F", text=word
        )

    utterances, skipped = _scan(
        _root(data_dir, "tess", "**/*.wav"), _TESS, "TESS's <OAF|YAF>_<word>_<emotion> code", build
    )
    return _finish("tess", list(TESS_LABELS.values()), utterances, skipped, "loso")


# ----------------------------------------------------------------------------- EMOVO

EMOVO_LABELS = {
    "rab": "angry",
    "dis": "disgust",
    "pau": "fearful",
    "gio": "happy",
    "neu": "neutral",
    "tri": "sad",
    "sor": "surprised",
}
_EMOVO = re.compile(r"^(" + "|".join(EMOVO_LABELS) + r")-([fm][1-3])-([bdln][1-5])$")


def load_emovo(data_dir) -> Corpus:
    """EMOVO (Costantini et al., LREC 2014): Italian, 6 actors (f1-f3 female, m1-m3 male), 7 emotions
    x 14 sentences each; the actor comes from the file name, never from its folder."""

    def build(wav, m):
        emo, actor, sentence = m.groups()
        return Utterance(
            uid=wav.stem,
            label=EMOVO_LABELS[emo],
            speaker=actor,
            path=str(wav),
            gender=actor[0].upper(),
            text=sentence,
        )

    utterances, skipped = _scan(
        _root(data_dir, "emovo", "[fm][1-3]"), _EMOVO, "EMOVO's <emotion>-<actor>-<sentence> code", build
    )
    return _finish("emovo", list(EMOVO_LABELS.values()), utterances, skipped, "loso")


def _finish(name, classes, utterances, skipped, default_split) -> Corpus:
    if not utterances:
        raise CorpusError(
            f"{name}: no utterances found; expected layout: {LAYOUTS[name]}"
            + (f" ({len(skipped)} files did not parse)" if skipped else "")
        )
    present = {u.label for u in utterances}
    return Corpus(name, [c for c in classes if c in present], utterances, skipped=skipped, default_split=default_split)


LOADERS = {
    "iemocap": load_iemocap,
    "emodb": load_emodb,
    "ravdess": load_ravdess,
    "cremad": load_cremad,
    "tess": load_tess,
    "emovo": load_emovo,
}


def load_corpus(name: str, data_dir: Optional[os.PathLike] = None, **options) -> Corpus:
    if name == "synthetic":  # options: seed, n_speakers, per_class; cache_dir (None: generate every time)
        from fastser.data.synthetic import cached_corpus

        return cached_corpus(options.pop("cache_dir", None), **options)
    if name not in LOADERS:
        raise ValueError(f"unknown corpus {name!r}; choose from {['synthetic', *LOADERS]}")
    return LOADERS[name](data_dir, **options)
