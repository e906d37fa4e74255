"""Inference of a trained model, audio in, probabilities out: 3 s clips at 16 kHz, batch 1 and 32.

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


def _impl_fn(impl, run, files, clips):
    from fastser import export
    from fastser.predict import Predictor

    lengths = np.full(len(clips), clips.shape[1], dtype=np.int64)
    if impl == "predict":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor = Predictor(run, batch_size=len(clips))
        items = list(clips)
        return lambda: predictor.predict(items), None
    if impl == "onnxruntime":
        feeds = {"audio": clips, "lengths": lengths}
        session, _ = export.load_onnx(files["onnx"])
        bare, _ = export.load_onnx(files["onnx"], arena=False)
        return lambda: session.run(["probabilities"], feeds), lambda: bare.run(["probabilities"], feeds)
    module = export.load_torch(files["torch"])[0].module()
    audio, lens = torch.from_numpy(clips), torch.from_numpy(lengths)

    def call():
        with torch.no_grad():
            return module(audio, lens)

    return call, None


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["predict", "onnxruntime", "torch.export"])
def test_inference(benchmark, exported, impl, batch):
    run, files = exported
    clips, _ = make_clips(batch)
    fn, memory_fn = _impl_fn(impl, run, files, clips)
    _harness.run(
        benchmark,
        fn,
        torch.device("cpu"),
        suite="inference",
        group=f"3s_B{batch}",
        impl=impl,
        baseline="predict",
        extra={"utterances": batch},
        budget_s=2.0,
        rss_memory=True,
        memory_fn=memory_fn,
    )
