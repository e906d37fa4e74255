"""Inference of a trained model, audio in, probabilities out: 3 s clips at 16 kHz, batch 1 and 32.

Groups 3s_B1 / 3s_B32: the model alone. Groups 3s_B1_fused / 3s_B32_fused: the default on real
corpora, the model fused with ComParE functionals (every implementation runs openSMILE on the
clips inside the timed call: predict does, the exported files take its output as an input), beside
the classic baseline's own prediction (openSMILE ComParE + standardisation + linear SVM). Group
folder_200x3s_fused: `python -m fastser.predict`'s path over a folder of 200 3-s files
(`Predictor.predict_files`), one process against one worker process per usable core.

The model: the default architecture (two CNN branches over log-mel and MFCCs, the prosody branch;
width 16, embedding 128), trained for one epoch on a small synthetic corpus (its weights do not
change the time). Implementations: "predict" — `fastser.Predictor.predict` on a list of arrays,
how a Python user scores clips (the baseline; on the CPU the fused C++ features); "onnxruntime" —
the `python -m fastser.export --format onnx` file in an onnxruntime CPU session; "torch.export" —
the `--format torch` file through `torch.export.load(...).module()`. All on the CPU, in one run;
each call scores the whole batch. Memory: the process's peak resident memory during a call above
its resident memory before (onnxruntime allocates outside torch and NumPy), for all three alike;
onnxruntime's is measured on a session without its memory arena, which would keep a call's buffers
resident between calls and hide them (the time is the default session's).
"""

import warnings

import numpy as np
import pytest
import torch

from benchmarks import _harness
from benchmarks.test_features import make_clips

SR = 16000
BATCHES = (1, 32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the [export] extra")
    import fastser.train as train
    from fastser import export

    run = tmp_path_factory.mktemp("inference") / "run"
    train.main(
        ["--synthetic-speakers", "6", "--synthetic-per-class", "4", "--epochs", "1", "--no-progress", "--out", str(run)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trained on the synthetic corpus: known
        return run, {fmt: export.export(run, fmt) for fmt in export.FORMATS}


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """The default model fused with ComParE functionals, its exported files, and a linear SVM over
    the same functionals (the classic baseline), fitted on the synthetic corpus's clips."""
    pytest.importorskip("onnxruntime", reason="the [export] extra")
    pytest.importorskip("opensmile")
    import fastser.train as train
    from fastser import export, functionals
    from fastser.data.synthetic import make_corpus
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    run = tmp_path_factory.mktemp("inference") / "fused"
    flags = ["--synthetic-speakers", "6", "--synthetic-per-class", "4", "--epochs", "1", "--no-progress"]
    train.main(flags + ["--functionals", "compare", "--out", str(run)])
    corpus = make_corpus(seed=0, n_speakers=6, per_class=4)
    x = functionals.extract([u.audio for u in corpus.utterances], "compare")
    svm = make_pipeline(StandardScaler(), SVC(kernel="linear", C=0.01, class_weight="balanced")).fit(x, corpus.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run, {fmt: export.export(run, fmt) for fmt in export.FORMATS}, svm


def _impl_fn(impl, run, files, clips, svm=None):
    """(the timed call, the call memory is measured on or None). With `svm` (a fused run), every
    implementation runs openSMILE on the clips inside the call, as a user of each does."""
    from fastser import export
    from fastser.predict import Predictor

    lengths = np.full(len(clips), clips.shape[1], dtype=np.int64)
    smile = _smile() if svm is not None else None  # built once, as a user's program does

    def inputs() -> dict:
        feeds = {"audio": clips, "lengths": lengths}
        if smile is not None:  # the user's openSMILE step, as the README's snippet runs it
            feeds["functionals"] = np.concatenate([smile.process_signal(c, SR).to_numpy(np.float32) for c in clips])
        return feeds

    if impl == "predict":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor = Predictor(run, batch_size=len(clips))
        items = list(clips)
        return lambda: predictor.predict(items), None
    if impl == "opensmile+svm":
        return lambda: svm.predict(inputs()["functionals"]), None
    if impl == "onnxruntime":
        session, _ = export.load_onnx(files["onnx"])
        bare, _ = export.load_onnx(files["onnx"], arena=False)
        return lambda: session.run(["probabilities"], inputs()), lambda: bare.run(["probabilities"], inputs())
    module = export.load_torch(files["torch"])[0].module()

    def call():
        with torch.no_grad():
            return module(*(torch.from_numpy(v) for v in inputs().values()))

    return call, None


def _smile():
    import opensmile

    return opensmile.Smile(opensmile.FeatureSet.ComParE_2016, opensmile.FeatureLevel.Functionals)


CASES = [("model", impl) for impl in ("predict", "onnxruntime", "torch.export")] + [
    ("fused", impl) for impl in ("predict", "onnxruntime", "torch.export", "opensmile+svm")
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model, impl", CASES)
def test_inference(benchmark, request, model, impl, batch):
    run, files, *svm = request.getfixturevalue("exported" if model == "model" else "fused")
    clips, _ = make_clips(batch)
    fn, memory_fn = _impl_fn(impl, run, files, clips, *svm)
    _harness.run(
        benchmark,
        fn,
        torch.device("cpu"),
        suite="inference",
        group=f"3s_B{batch}" + ("_fused" if model == "fused" else ""),
        impl=impl,
        baseline="predict",
        extra={"utterances": batch},
        budget_s=2.0,
        rss_memory=True,
        memory_fn=memory_fn,
    )


FOLDER_FILES = 200


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import soundfile as sf

    out = tmp_path_factory.mktemp("folder")
    clips, _ = make_clips(FOLDER_FILES)
    paths = []
    for i, clip in enumerate(clips):
        paths.append(out / f"clip{i:03d}.wav")
        sf.write(paths[-1], clip, SR)
    return paths


@pytest.mark.parametrize("impl", ["1-process", "every-core"])
def test_folder_inference(benchmark, fused, folder, impl):
    from fastser.predict import Predictor
    from fastser.threads import usable_cores

    run, _, _ = fused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor = Predictor(run)
    workers = 1 if impl == "1-process" else usable_cores()

    def call():
        return list(predictor.predict_files(folder, workers=workers))

    _harness.run(
        benchmark,
        call,
        torch.device("cpu"),
        suite="inference",
        group=f"folder_{FOLDER_FILES}x3s_fused",
        impl=impl,
        baseline="1-process",
        extra={"utterances": FOLDER_FILES, "workers": workers},
        budget_s=1.0,
        rss_memory=True,
    )
