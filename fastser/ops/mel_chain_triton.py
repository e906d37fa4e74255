"""One fused Triton kernel for everything after the FFT: |X|^p -> mel -> dB (amin, ref) ->
per-utterance top_db clamp -> DCT -> lifter.

One program per utterance. Pass 1 reads the complex STFT once, block of frames by block of
frequency bins, projects onto the mel filters (tl.dot), converts to dB and writes the log-mel
into the output while tracking the utterance's maximum over its valid frames. Pass 2 (only
when the ref/top_db/DCT steps need that maximum) re-reads the log-mel it wrote — n_mels rows,
not the n_fft/2+1 complex rows of the STFT — clamps it and applies the DCT. Padded frames
(t >= frames[b]) are written as zeros and never enter the maximum.

`mel_chain_launch` turns tensors into a TritonLaunch (every argument by name); the GPU compile
gate (tests/ops/test_gpu_compile.py) compiles those launches for sm_80/sm_90.
"""
import triton
import triton.language as tl

from fastser.ops._triton_launch import TritonLaunch

# A kernel may read a module global only when it is a tl.constexpr: the CPU interpreter accepts a
# plain float, the GPU compiler refuses it (this crashed every CUDA run once).
LOG10_2 = tl.constexpr(0.30102999566398120)


@triton.jit
def _mel_chain_kernel(SPEC_ptr, FB_ptr, DCT_ptr, LIFT_ptr, FRAMES_ptr, MEL_OUT_ptr, MFCC_OUT_ptr,
                      F, T, M, K,
                      s_b, s_f, s_t,  # strides of the real view of the complex STFT (B, F, T, 2)
                      power, amin, log_ref, top_db,
                      POWER_MODE: tl.constexpr,  # 2: |X|^2, 1: |X|, 0: |X|^power
                      TO_DB: tl.constexpr, REF_MAX: tl.constexpr, USE_TOP_DB: tl.constexpr,
                      DO_DCT: tl.constexpr,
                      BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n_frames = tl.load(FRAMES_ptr + b)
    m_idx = tl.arange(0, BLOCK_M)
    m_ok = m_idx < M
    run_max = float("-inf")
    for t0 in range(0, T, BLOCK_T):
        t_idx = t0 + tl.arange(0, BLOCK_T)
        t_ok = t_idx < T
        acc = tl.zeros((BLOCK_M, BLOCK_T), tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f_idx = f0 + tl.arange(0, BLOCK_F)
            f_ok = f_idx < F
            ptr = SPEC_ptr + b * s_b + f_idx[:, None] * s_f + t_idx[None, :] * s_t
            msk = f_ok[:, None] & t_ok[None, :]
            re = tl.load(ptr, mask=msk, other=0.0)
            im = tl.load(ptr + 1, mask=msk, other=0.0)
            p = re * re + im * im
            if POWER_MODE == 1:
                p = tl.sqrt(p)
            if POWER_MODE == 0:
                p = tl.where(p > 0, tl.exp2(tl.log2(tl.maximum(p, 1e-38)) * (power * 0.5)), 0.0)
            fb = tl.load(FB_ptr + m_idx[:, None] * F + f_idx[None, :], mask=m_ok[:, None] & f_ok[None, :], other=0.0)
            acc += tl.dot(fb, p, input_precision="ieee")
        valid = m_ok[:, None] & (t_idx[None, :] < n_frames)
        val = acc
        if TO_DB:
            val = 10.0 * LOG10_2 * tl.log2(tl.maximum(acc, amin))
        run_max = tl.maximum(run_max, tl.max(tl.max(tl.where(valid, val, float("-inf")), axis=1), axis=0))
        out = tl.where(valid, val - log_ref, 0.0)
        tl.store(MEL_OUT_ptr + b * M * T + m_idx[:, None] * T + t_idx[None, :], out, mask=m_ok[:, None] & t_ok[None, :])

    if TO_DB and (REF_MAX or USE_TOP_DB or DO_DCT):
        tl.debug_barrier()  # pass 2 reads what other threads of this program wrote in pass 1
        # ref = utterance max (log_ref is 0 then): shift everything by the max, which becomes 0 dB.
        # ref = constant: pass 1 already subtracted log_ref; the max after that is run_max - log_ref.
        if REF_MAX:
            shift = run_max
            top = 0.0
        else:
            shift = 0.0
            top = run_max - log_ref
        k_idx = tl.arange(0, BLOCK_K)
        k_ok = k_idx < K
        if DO_DCT:
            dct = tl.load(DCT_ptr + k_idx[:, None] * M + m_idx[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            lift = tl.load(LIFT_ptr + k_idx, mask=k_ok, other=0.0)
        for t0 in range(0, T, BLOCK_T):
            t_idx = t0 + tl.arange(0, BLOCK_T)
            t_ok = t_idx < T
            valid = m_ok[:, None] & (t_idx[None, :] < n_frames)
            ptr = MEL_OUT_ptr + b * M * T + m_idx[:, None] * T + t_idx[None, :]
            v = tl.load(ptr, mask=m_ok[:, None] & t_ok[None, :], other=0.0) - shift
            if USE_TOP_DB:
                v = tl.maximum(v, top - top_db)
            v = tl.where(valid, v, 0.0)
            tl.store(ptr, v, mask=m_ok[:, None] & t_ok[None, :])
            if DO_DCT:
                c = tl.dot(dct, v, input_precision="ieee") * lift[:, None]
                c = tl.where(t_idx[None, :] < n_frames, c, 0.0)
                tl.store(MFCC_OUT_ptr + b * K * T + k_idx[:, None] * T + t_idx[None, :], c,
                         mask=k_ok[:, None] & t_ok[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def mel_chain_launch(spec_real, fb, frames, mel_out, *, power, to_db, amin, log_ref, ref_max, top_db,
                     dct=None, lift=None, mfcc_out=None) -> TritonLaunch:
    """spec_real: torch.view_as_real of the (B, F, T) complex64 STFT; fb (M, F) fp32; frames (B,) int32;
    mel_out (B, M, T) fp32; with dct (K, M), lift (K,) and mfcc_out (B, K, T) the MFCCs too."""
    B, F, T, _ = spec_real.shape
    M = fb.shape[0]
    K = dct.shape[0] if dct is not None else 1
    power_mode = 2 if power == 2.0 else (1 if power == 1.0 else 0)
    block_m = _pow2(M)
    if block_m > 256:
        raise ValueError(f"the fused kernel supports n_mels <= 256, got {M}")
    unused = fb  # stands in for pointers that a constexpr branch never touches
    return TritonLaunch(_mel_chain_kernel, (B,), dict(
        SPEC_ptr=spec_real, FB_ptr=fb, DCT_ptr=dct if dct is not None else unused,
        LIFT_ptr=lift if lift is not None else unused, FRAMES_ptr=frames, MEL_OUT_ptr=mel_out,
        MFCC_OUT_ptr=mfcc_out if mfcc_out is not None else mel_out,
        F=F, T=T, M=M, K=K, s_b=spec_real.stride(0), s_f=spec_real.stride(1), s_t=spec_real.stride(2),
        power=float(power), amin=float(amin), log_ref=float(log_ref),
        top_db=float(top_db if top_db is not None else 0.0),
        POWER_MODE=power_mode, TO_DB=bool(to_db), REF_MAX=bool(ref_max), USE_TOP_DB=top_db is not None,
        DO_DCT=dct is not None, BLOCK_F=32, BLOCK_T=32 if block_m > 64 else 64, BLOCK_M=block_m,
        BLOCK_K=_pow2(K)), dict(num_warps=4))


def mel_chain(spec_real, fb, frames, mel_out, **kwargs) -> None:
    """Runs the fused chain; arguments as `mel_chain_launch`."""
    mel_chain_launch(spec_real, fb, frames, mel_out, **kwargs).launch()
