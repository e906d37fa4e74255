"""Two Triton kernels for everything after the FFT: |X|^p -> mel -> dB (amin, ref) -> per-utterance
top_db clamp -> DCT -> lifter.

The grid is (utterance, tile of BLOCK_T frames) for both, so a batch of 256 three-second clips is
4,864 programs rather than 256: one program per utterance would keep each SM busy with one long
serial loop and hold a whole DCT matrix in registers across it (255 registers and 1.3 KB of spills
per thread for log-mel, 6.5 KB for MFCC on sm_90; the GPU compile gate refuses spills).

`_mel_db_kernel` reads its tile of the complex STFT once (padded frames are masked out of the
loads, so they cost no memory traffic), applies the periodic Hann window there when the STFT was
taken without one (a 3-tap filter over the bins: the FFT then reads the padded signal in place),
projects it onto the mel filters with tl.dot on tensor cores (tf32x3: fp32 accuracy), converts to
dB and writes the tile, plus the tile's maximum over its valid frames when a later step needs the
utterance's maximum. `_db_finish_kernel` (only for
ref=max, top_db or MFCCs) reduces the utterance's tile maxima (a few dozen floats), re-reads its
n_mels x BLOCK_T tile of dB — never the n_fft/2+1 complex rows of the spectrum — clamps it and
applies the DCT and lifter (tensor cores up to 64 mels). No atomics, no
host synchronisation: the result is the same bit for bit whatever the launch order, and the
maximum is each utterance's own, over its valid frames.

Every launcher returns TritonLaunch objects (every argument by name); the GPU compile gate
(tests/ops/test_gpu_compile.py) compiles exactly those for sm_80/sm_90.
"""

import triton
import triton.language as tl

from fastser.ops._triton_launch import TritonLaunch, cdiv, next_power_of_2

# A kernel may read a module global only when it is a tl.constexpr: the CPU interpreter accepts a
# plain float, the GPU compiler refuses it (this crashed every CUDA run once).
LOG10_2 = tl.constexpr(0.30102999566398120)

# Tile sizes, chosen by the registers and spills of the sm_90 build (the GPU compile gate records
# them): on fp32 FMA, BLOCK_T = BLOCK_F = 32 needed 255 registers and spilled at 40 mels on 4 warps;
# 16 x 16 on 8 warps needs 61 registers at 64 mels and 135 at 256 with the tf32x3 tensor-core
# product (80 and 178 on FMA), 171 at 256 with the in-kernel Hann window's two neighbour loads.
# tl.dot needs at least 16 in every dimension.
BLOCK_T = 16  # frames per program: 0.16 s at a 10 ms hop
BLOCK_F = 16  # frequency bins per step of the mel projection
BLOCK_K = 32  # cepstral coefficients per step of the DCT (bounds the DCT tile held in registers)
MAX_MELS = 256


@triton.jit
def _hann_windowed(frame_ptr, pairs, f0, c_idx, F, t_valid):
    """The periodic-Hann-windowed bins of a tile of the rectangular (unwindowed) spectrum: a Hann
    window of n_fft samples, 1/2 - cos(2 pi n / n_fft)/2, is in the DFT the 3-tap filter
    X_w[k] = X[k]/2 - (X[k-1] + X[k+1])/4, with X[-1] = conj(X[1]) and X[F] = conj(X[F-2]) for a
    real frame (F = n_fft/2 + 1). `pairs` (frames x interleaved re, im) holds X[f0 .. f0+BLOCK_F);
    the neighbours are two more loads of the same rows, 8 bytes either side, from L1."""
    f = f0 + c_idx // 2
    part = c_idx % 2  # 0: real, 1: imaginary
    ok = t_valid[:, None] & (f < F)[None, :]
    below = tl.abs(f - 1)
    above = tl.where(f + 1 < F, f + 1, 2 * F - 3 - f)
    lo = tl.load(frame_ptr + (2 * below + part)[None, :], mask=ok, other=0.0)
    hi = tl.load(frame_ptr + (2 * above + part)[None, :], mask=ok, other=0.0)
    lo = tl.where(((f == 0) & (part == 1))[None, :], -lo, lo)  # conjugated across the edges
    hi = tl.where(((f == F - 1) & (part == 1))[None, :], -hi, hi)
    return 0.5 * pairs - 0.25 * (lo + hi)


# The frame count T (and the strides and tile counts that follow from it) changes with every batch:
# not specialised on its value, so a new clip length compiles nothing new. With T unknown the rows
# of the (B, M, T) outputs start unaligned anyway, so the sizes of the configuration (F, M, K) are
# not specialised either: one build per choice of flags and tiles, whatever the filterbank.
@triton.jit(do_not_specialize=["F", "T", "M", "n_tiles", "s_b"])
def _mel_db_kernel(
    SPEC_ptr,
    FB_ptr,
    FRAMES_ptr,
    OUT_ptr,
    TILE_MAX_ptr,
    F,
    T,
    M,
    n_tiles,
    s_b,
    s_t,  # strides of the real view of the frame-major complex STFT (B, F, T, 2): 2 along F
    power,
    amin,
    log_ref,
    POWER_MODE: tl.constexpr,  # 2: |X|^2, 1: |X|, 0: |X|^power
    TO_DB: tl.constexpr,
    WRITE_TILE_MAX: tl.constexpr,
    HANN_FOLD: tl.constexpr,  # the spectrum is unwindowed: apply the periodic Hann window here
    BLOCK_F: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_frames = tl.load(FRAMES_ptr + b)
    t_idx = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t_idx < T
    t_valid = t_idx < n_frames
    m_idx = tl.arange(0, BLOCK_M)
    m_ok = m_idx < M
    acc = tl.zeros((BLOCK_T, BLOCK_M), tl.float32)  # frames x mels: the spectrum tile is the dot's A
    c_idx = tl.arange(0, 2 * BLOCK_F)  # the interleaved re, im of BLOCK_F bins
    for f0 in range(0, F, BLOCK_F):
        f_idx = f0 + tl.arange(0, BLOCK_F)
        f_ok = f_idx < F
        # each frame's BLOCK_F bins are 2 * BLOCK_F consecutive floats: one coalesced row per frame
        # (read along time, neighbouring lanes would be 2 * F floats apart)
        frame_ptr = SPEC_ptr + b * s_b + t_idx[:, None] * s_t
        pairs = tl.load(
            frame_ptr + (2 * f0 + c_idx)[None, :], mask=t_valid[:, None] & (2 * f0 + c_idx < 2 * F)[None, :], other=0.0
        )
        if HANN_FOLD:
            pairs = _hann_windowed(frame_ptr, pairs, f0, c_idx, F, t_valid)
        re, im = tl.split(tl.reshape(pairs, (BLOCK_T, BLOCK_F, 2)))
        p = re * re + im * im  # (BLOCK_T, BLOCK_F)
        if POWER_MODE == 1:
            p = tl.sqrt(p)
        if POWER_MODE == 0:
            p = tl.where(p > 0, tl.exp2(tl.log2(tl.maximum(p, 1e-38)) * (power * 0.5)), 0.0)
        fb_t = tl.load(FB_ptr + m_idx[None, :] * F + f_idx[:, None], mask=f_ok[:, None] & m_ok[None, :], other=0.0)
        # tensor cores at fp32 accuracy: tf32x3 splits each operand into a TF32 part and its
        # remainder and sums three TF32 products. Emulated (tests/ops/test_mel_chain.py) it uses at
        # most 4% of the bounds the kernels are held to against the exact chain; plain TF32 (about 5e-4
        # relative) exceeds them 12-37 times, though it would still meet librosa's looser ones.
        acc += tl.dot(p, fb_t, input_precision="tf32x3")
    acc = tl.trans(acc)  # (BLOCK_M, BLOCK_T): the output rows are mels
    valid = m_ok[:, None] & t_valid[None, :]
    val = acc
    if TO_DB:
        val = 10.0 * LOG10_2 * tl.log2(tl.maximum(acc, amin))
    out = tl.where(valid, val - log_ref, 0.0)
    tl.store(OUT_ptr + b * M * T + m_idx[:, None] * T + t_idx[None, :], out, mask=m_ok[:, None] & t_ok[None, :])
    if WRITE_TILE_MAX:  # -inf for a tile of padding only; the utterance's first tile always has frames
        tl.store(TILE_MAX_ptr + b * n_tiles + tile, tl.max(tl.max(tl.where(valid, val, float("-inf")), axis=1), axis=0))


@triton.jit(do_not_specialize=["T", "M", "K", "n_tiles"])
def _db_finish_kernel(
    DB_ptr,
    TILE_MAX_ptr,
    FRAMES_ptr,
    DCT_ptr,
    LIFT_ptr,
    MFCC_OUT_ptr,
    T,
    M,
    K,
    n_tiles,
    log_ref,
    top_db,
    REF_MAX: tl.constexpr,
    USE_TOP_DB: tl.constexpr,
    WRITE_DB: tl.constexpr,
    DO_DCT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
    DCT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_frames = tl.load(FRAMES_ptr + b)
    utt_max = float("-inf")
    for i0 in range(0, n_tiles, BLOCK_TILES):
        i = i0 + tl.arange(0, BLOCK_TILES)
        utt_max = tl.maximum(
            utt_max, tl.max(tl.load(TILE_MAX_ptr + b * n_tiles + i, mask=i < n_tiles, other=float("-inf")), axis=0)
        )
    # ref = utterance max (log_ref is 0 then): shift everything by the max, which becomes 0 dB.
    # ref = constant: the first kernel already subtracted log_ref; the max after that is utt_max - log_ref.
    if REF_MAX:
        shift = utt_max
        top = 0.0
    else:
        shift = 0.0
        top = utt_max - log_ref
    t_idx = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t_idx < T
    m_idx = tl.arange(0, BLOCK_M)
    m_ok = m_idx < M
    valid = m_ok[:, None] & (t_idx[None, :] < n_frames)
    ptr = DB_ptr + b * M * T + m_idx[:, None] * T + t_idx[None, :]
    v = tl.load(ptr, mask=valid, other=0.0) - shift
    if USE_TOP_DB:
        v = tl.maximum(v, top - top_db)
    v = tl.where(valid, v, 0.0)
    if WRITE_DB:
        tl.store(ptr, v, mask=m_ok[:, None] & t_ok[None, :])
    if DO_DCT:
        for k0 in range(0, K, BLOCK_K):
            k_idx = k0 + tl.arange(0, BLOCK_K)
            k_ok = k_idx < K
            dct = tl.load(DCT_ptr + k_idx[:, None] * M + m_idx[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            lift = tl.load(LIFT_ptr + k_idx, mask=k_ok, other=0.0)
            c = tl.dot(dct, v, input_precision=DCT_PRECISION) * lift[:, None]
            c = tl.where(t_idx[None, :] < n_frames, c, 0.0)
            tl.store(
                MFCC_OUT_ptr + b * K * T + k_idx[:, None] * T + t_idx[None, :], c, mask=k_ok[:, None] & t_ok[None, :]
            )


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(n))


def mel_chain_launches(
    spec_real,
    fb,
    frames,
    mel_out,
    tile_max,
    *,
    power,
    to_db,
    amin,
    log_ref,
    ref_max,
    top_db,
    dct=None,
    lift=None,
    mfcc_out=None,
    hann_fold=False,
) -> list:
    """The launches of the chain, in order.

    spec_real: torch.view_as_real of the (B, F, T) complex64 STFT, frame-major (strides (s_b, 2, s_t,
    1) in floats, as torch.stft returns it); fb (M, F) fp32; frames (B,) int32;
    mel_out (B, M, T) fp32: the result for mel/log-mel, scratch for MFCCs; tile_max (B, n_tiles(T))
    fp32 scratch; with dct (K, M), lift (K,) and mfcc_out (B, K, T) the MFCCs too. hann_fold: the
    STFT was taken without a window and the kernel applies a periodic Hann window of n_fft samples
    (see _hann_windowed), so the windowed frames are never written."""
    B, F, T, _ = spec_real.shape
    if spec_real.stride(1) != 2 or spec_real.stride(3) != 1:
        raise ValueError(f"the STFT must be frame-major (bins contiguous), got strides {spec_real.stride()}")
    M = fb.shape[0]
    K = dct.shape[0] if dct is not None else 1
    if M > MAX_MELS:
        raise ValueError(f"the fused kernels support n_mels <= {MAX_MELS}, got {M}")
    tiles = n_tiles(T)
    finish = to_db and (ref_max or top_db is not None or dct is not None)
    power_mode = 2 if power == 2.0 else (1 if power == 1.0 else 0)
    block_m = _pow2(M)
    # wide mel tiles: more warps, so the accumulator and the dot operands stay in registers
    options = dict(num_warps=8 if block_m > 32 else 4)
    launches = [
        TritonLaunch(
            _mel_db_kernel,
            (B, tiles),
            dict(
                SPEC_ptr=spec_real,
                FB_ptr=fb,
                FRAMES_ptr=frames,
                OUT_ptr=mel_out,
                TILE_MAX_ptr=tile_max,
                F=F,
                T=T,
                M=M,
                n_tiles=tiles,
                s_b=spec_real.stride(0),
                s_t=spec_real.stride(2),
                power=float(power),
                amin=float(amin),
                log_ref=float(log_ref),
                POWER_MODE=power_mode,
                TO_DB=bool(to_db),
                WRITE_TILE_MAX=finish,
                HANN_FOLD=bool(hann_fold),
                BLOCK_F=BLOCK_F,
                BLOCK_T=BLOCK_T,
                BLOCK_M=block_m,
            ),
            options,
        )
    ]
    if finish:
        unused = fb  # stands in for pointers that a constexpr branch never touches
        launches.append(
            TritonLaunch(
                _db_finish_kernel,
                (B, tiles),
                dict(
                    DB_ptr=mel_out,
                    TILE_MAX_ptr=tile_max,
                    FRAMES_ptr=frames,
                    DCT_ptr=dct if dct is not None else unused,
                    LIFT_ptr=lift if lift is not None else unused,
                    MFCC_OUT_ptr=mfcc_out if mfcc_out is not None else mel_out,
                    T=T,
                    M=M,
                    K=K,
                    n_tiles=tiles,
                    log_ref=float(log_ref),
                    top_db=float(top_db if top_db is not None else 0.0),
                    REF_MAX=bool(ref_max),
                    USE_TOP_DB=top_db is not None,
                    WRITE_DB=dct is None,
                    DO_DCT=dct is not None,
                    BLOCK_T=BLOCK_T,
                    BLOCK_M=block_m,
                    BLOCK_K=min(BLOCK_K, _pow2(K)),
                    BLOCK_TILES=min(256, _pow2(tiles)),
                    DCT_PRECISION=dct_precision(block_m),
                ),
                options,
            )
        )
    return launches


def dct_precision(block_m: int) -> str:
    """The DCT's precision: tensor cores (tf32x3) up to 64 mels (the usual MFCC filterbanks: 120
    registers on sm_90, 25% occupancy); wider, the split operands cost registers the kernel has
    not got (128 mels: 186, 12.5% occupancy; 256: a 168-byte spill), so it stays on fp32 FMA."""
    return "tf32x3" if block_m <= 64 else "ieee"


def n_tiles(T: int) -> int:
    return cdiv(max(T, 1), BLOCK_T)
