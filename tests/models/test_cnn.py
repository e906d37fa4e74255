import pytest
import torch

from fastser.models import SERModel, mfcc_cnn, spectrogram_cnn, two_branch_cnn
from fastser.models.cnn import FrameMasks


@pytest.mark.parametrize(
    "build, kinds",
    [(spectrogram_cnn, {"logmel": 64}), (mfcc_cnn, {"mfcc": 40}), (two_branch_cnn, {"logmel": 64, "mfcc": 40})],
)
@pytest.mark.parametrize("T", [37, 160, 301])
@pytest.mark.parametrize("downsample", ["pool", "stem", "early"])
def test_shapes(build, kinds, T, downsample):
    model = build(5, width=4, embed_dim=32, downsample=downsample)
    feats = {k: torch.randn(3, b, T) for k, b in kinds.items()}
    frames = torch.tensor([T, T - 5, 9])
    out = model(feats, frames)
    assert out.logits.shape == (3, 5) and out.embedding.shape == (3, 32)
    assert set(out.reconstruction) == set(kinds)
    for k, b in kinds.items():
        assert out.reconstruction[k].shape == (3, b, T)
    model.eval()
    assert model(feats, frames).reconstruction == {}  # the decoder is a training-time regulariser


@pytest.mark.parametrize("n", [120, 7, 205])
@pytest.mark.parametrize("downsample", ["pool", "stem", "early"])
def test_an_utterance_gives_the_same_result_alone_or_padded_in_a_batch(n, downsample):
    torch.manual_seed(1)
    model = two_branch_cnn(4, width=4, embed_dim=16, downsample=downsample)
    for _ in range(3):  # non-trivial batch-norm statistics, then evaluate
        model({"logmel": torch.randn(4, 64, 90) + 2, "mfcc": torch.randn(4, 40, 90)}, torch.full((4,), 90))
    model.eval()
    alone = {"logmel": torch.randn(1, 64, n), "mfcc": torch.randn(1, 40, n)}
    T = 300
    batch = {k: 1e3 * torch.randn(3, v.shape[1], T) for k, v in alone.items()}  # garbage everywhere else
    for k in batch:
        batch[k][1, :, :n] = alone[k][0]
    a = model(alone, torch.tensor([n]))
    b = model(batch, torch.tensor([T, n, 50]))
    torch.testing.assert_close(b.logits[1:2], a.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.embedding[1:2], a.embedding, rtol=1e-4, atol=1e-4)


def test_any_length_and_few_parameters():
    model = two_branch_cnn(4)
    # the paper's "few parameters": ~0.2M in the convolutions, ~0.2M in the embedding layer that reads
    # the per-band pooled maps
    assert sum(p.numel() for p in model.parameters()) < 400_000
    model.eval()
    for T in (8, 33, 999):
        assert model(
            {"logmel": torch.randn(2, 64, T), "mfcc": torch.randn(2, 40, T)}, torch.tensor([T, T])
        ).logits.shape == (2, 4)


def test_wrong_input_is_a_clear_error():
    model = SERModel({"mfcc": 40}, 4, width=4)
    with pytest.raises(ValueError, match="missing"):
        model({"logmel": torch.randn(1, 40, 50)}, torch.tensor([50]))
    with pytest.raises(ValueError, match=r"mfcc features must be \(batch, 40, frames\)"):
        model({"mfcc": torch.randn(1, 13, 50)}, torch.tensor([50]))


def test_prosody_branch_is_fused_before_the_embedding_and_pads_cleanly():
    """A "prosody" input (B, 6, T) gets a 1-D contour encoder and no decoder; an utterance gives the
    same embedding alone or padded in a batch; gradients reach the contour encoder."""
    torch.manual_seed(2)
    kinds = {"logmel": 64, "prosody": 6}
    model = SERModel(kinds, 4, width=4, embed_dim=16)
    feats = {k: torch.randn(3, b, 120) for k, b in kinds.items()}
    out = model(feats, torch.tensor([120, 80, 9]))
    assert set(out.reconstruction) == {"logmel"}
    out.logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["prosody"].parameters())
    model.eval()
    n, T = 70, 200
    alone = {k: torch.randn(1, b, n) for k, b in kinds.items()}
    batch = {k: 1e3 * torch.randn(3, b, T) for k, b in kinds.items()}
    for k in batch:
        batch[k][2, :, :n] = alone[k][0]
    a = model(alone, torch.tensor([n]))
    b = model(batch, torch.tensor([T, 50, n]))
    torch.testing.assert_close(b.embedding[2:], a.embedding, rtol=1e-4, atol=1e-4)


def test_bin_stats_hand_each_bins_utterance_mean_and_std_to_the_embedding():
    """bin_stats: the pooled vector ends with every input bin's mean and std over the valid frames
    (padding ignored), the same alone or padded, and the embedding layer reads them."""
    torch.manual_seed(3)
    kinds = {"logmel": 64, "mfcc": 40}
    model = SERModel(kinds, 4, width=4, embed_dim=16, bin_stats=True).eval()
    plain = SERModel(kinds, 4, width=4, embed_dim=16)
    enc = model.encoders["mfcc"]
    assert enc.out_dim == plain.encoders["mfcc"].out_dim + 2 * 40
    n, T = 90, 160
    x = 1e3 * torch.randn(2, 40, T)
    x[1, :, :n] = torch.randn(40, n) * 3 + 2
    _, vec = enc(x, torch.tensor([T, n]))
    valid = x[1, :, :n]
    torch.testing.assert_close(vec[1, -80:-40], valid.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vec[1, -40:], valid.std(1, unbiased=False), rtol=1e-4, atol=1e-4)
    alone = {k: torch.randn(1, b, n) for k, b in kinds.items()}
    batch = {k: 1e3 * torch.randn(3, b, T) for k, b in kinds.items()}
    for k in batch:
        batch[k][0, :, :n] = alone[k][0]
    torch.testing.assert_close(
        model(batch, torch.tensor([n, T, 40])).embedding[:1],
        model(alone, torch.tensor([n])).embedding,
        rtol=1e-4,
        atol=1e-4,
    )
    # the statistics change the embedding: shift one bin's level and the output moves
    shifted = {k: v.clone() for k, v in alone.items()}
    shifted["mfcc"][0, 5] += 1.0
    assert not torch.allclose(model(shifted, torch.tensor([n])).embedding, model(alone, torch.tensor([n])).embedding)


def test_time_pooling_keeps_one_mean_and_max_per_frequency_band():
    """pooling="time": the pooled vector is the last map's mean and max over the valid frames for
    each (channel, frequency band), 2 * C * bins/8 values; "global" is their mean and max over the
    bands; both are the same for an utterance alone or padded in a batch."""
    torch.manual_seed(4)
    enc_time = SERModel({"logmel": 64}, 4, width=4, pooling="time").eval().encoders["logmel"]
    enc_global = SERModel({"logmel": 64}, 4, width=4, pooling="global").eval().encoders["logmel"]
    enc_global.load_state_dict(enc_time.state_dict())
    C = enc_time.out_channels
    assert enc_time.out_dim == 2 * C * 8 and enc_global.out_dim == 2 * C
    n, T = 75, 160
    x = 1e3 * torch.randn(2, 64, T)
    x[1, :, :n] = torch.randn(64, n)
    fmap, vec = enc_time(x, torch.tensor([T, n]))
    valid = fmap[1, :, :, : n // 8]  # (C, 8 bands, valid frames of the map)
    torch.testing.assert_close(vec[1, : C * 8], valid.mean(-1).flatten(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vec[1, C * 8 :], valid.amax(-1).flatten())
    _, vec_global = enc_global(x, torch.tensor([T, n]))
    torch.testing.assert_close(vec_global[1, :C], valid.mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vec_global[1, C:], valid.amax(dim=(1, 2)))
    _, alone = enc_time(x[1:, :, :n], torch.tensor([n]))
    torch.testing.assert_close(vec[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be one of"):
        SERModel({"logmel": 64}, 4, pooling="freq")


def test_batch_norm_keeps_no_batch_counter_and_older_state_dicts_still_load():
    """The counters nothing reads (fixed momentum) are gone from the model and its state dict; a
    state dict saved with them (an older checkpoint, with or without its metadata) loads, and the
    model computes the same as the one it came from."""
    from fastser.checkpoints import ModelSpec, build_model
    from fastser.features.featureset import FeatureSet

    fs = FeatureSet.paper(["logmel", "mfcc", "prosody"])
    torch.manual_seed(0)
    model = build_model(ModelSpec(fs, tuple("abcd"), pooling="time"))
    feats = {k: torch.randn(4, n, 40) for k, n in fs.n_bins.items()}
    frames = torch.tensor([40, 40, 33, 20])
    model.train()(feats, frames)  # moves the running statistics
    state = model.state_dict()
    assert not [k for k in state if k.endswith("num_batches_tracked")]
    batch_norms = [k[: -len("running_mean")] for k in state if k.endswith("running_mean")]
    assert len(batch_norms) == 17
    older = type(state)(state)  # as saved with the counters, the modules' version metadata kept
    older._metadata = state._metadata
    older.update({k + "num_batches_tracked": torch.tensor(7) for k in batch_norms})
    for saved in (older, dict(older)):  # dict(): a plain dict, without the metadata
        torch.manual_seed(1)
        loaded = build_model(ModelSpec(fs, tuple("abcd"), pooling="time"))
        loaded.load_state_dict(saved)
        model.eval(), loaded.eval()
        assert torch.equal(loaded(feats, frames).logits, model(feats, frames).logits)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict loading is otherwise unchanged
        loaded.load_state_dict({**state, "bogus": torch.zeros(1)})


def test_frame_masks_are_built_once_per_stride_and_agree_with_the_frame_counts():
    frames = torch.tensor([40, 17, 3, 1])
    masks = FrameMasks(frames)
    for stride, length in ((1, 40), (2, 20), (8, 5)):
        keep = masks.at(stride, length)
        valid = (frames // stride).clamp(min=1)
        expected = torch.arange(length)[None, :] < valid[:, None]
        assert torch.equal(keep[:, 0, 0], expected)
        assert torch.equal(masks.padding(stride, length), ~keep)
        assert torch.equal(masks.count(stride, length)[:, 0, 0], valid.clamp(max=length))
        # asked again by another branch or stage: the same tensors, nothing rebuilt
        assert masks.at(stride, length) is keep and masks.padding(stride, length) is masks.padding(stride, length)
        assert masks.count(stride, length) is masks.count(stride, length)
    longer = masks.at(8, 6)  # a map of another length at the same stride gets its own mask
    assert longer.shape[-1] == 6 and masks.count(8, 6)[:, 0, 0].tolist() == [5, 2, 1, 1]


def test_early_downsampling_keeps_the_map_sizes_and_runs_each_conv_at_the_coarser_resolution():
    """downsample="early": the same maps and pooled sizes as the paper's conv-then-pool order (so
    masks, bands and decoders are shared), from a stride-2 first conv and max-pooling before the other
    convolutions: every conv's output has the size of its stage's map, none runs at the input's."""
    feats = {"logmel": torch.randn(2, 64, 301), "mfcc": torch.randn(2, 40, 301)}
    frames = torch.tensor([301, 200])
    shapes = {}
    for downsample in ("pool", "stem", "early"):
        model = two_branch_cnn(4, width=4, embed_dim=16, downsample=downsample)
        conv_outputs = []
        for m in model.encoders["logmel"].modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda m, i, o: conv_outputs.append(tuple(o.shape[2:])))
        fmap, vec = model.encoders["logmel"](feats["logmel"], frames)
        shapes[downsample] = (fmap.shape, vec.shape, list(conv_outputs))
        assert model(feats, frames).reconstruction["logmel"].shape == (2, 64, 301)
    # the stride-2 stem computes the full-resolution conv's even positions
    stem = two_branch_cnn(4, width=4, downsample="early").encoders["logmel"].stem.branches[0]
    full = torch.nn.functional.conv2d(feats["logmel"][:, None], stem[1].weight, padding=(4, 1))
    torch.testing.assert_close(stem[1](stem[0](feats["logmel"][:, None])), full[:, :, 0::2, 0:300:2])
    assert shapes["pool"][:2] == shapes["early"][:2] == ((2, 16, 8, 37), (2, 2 * 16 * 8))
    assert shapes["pool"][2] == [(64, 301)] * 3 + [(32, 150), (16, 75)]
    assert shapes["early"][2] == [(32, 150)] * 3 + [(16, 75), (8, 37)]
    assert shapes["stem"][:2] == shapes["pool"][:2] and shapes["stem"][2] == [(32, 150)] * 3 + [(32, 150), (16, 75)]
    with pytest.raises(ValueError, match="downsample must be one of"):
        two_branch_cnn(4, downsample="stride")
