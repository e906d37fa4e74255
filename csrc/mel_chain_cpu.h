#pragma once
#include <cstdint>

namespace fastser {

// Everything after the FFT, fused, for one batch of utterances (float32, CPU, OpenMP over items):
// |X|^power -> mel (sparse: each filter touches only its own bins) -> dB (amin, ref) ->
// per-utterance top_db clamp -> DCT -> lifter. Each utterance is computed from its own frames
// only and in a fixed order, so a batched call is bit-identical to per-item calls.
//   spec     (B, T, F) complex64, frame-major (interleaved re, im)
//   frames   (B,) valid frames; output frames t >= frames[b] are written as 0
//   fb       (M, F) mel filters;  dct (K, M) and lift (K,) or null
//   mel_out  (B, M, T);  mfcc_out (B, K, T) or null
//   num_threads  the OpenMP team (the caller passes torch.get_num_threads())
void mel_chain_cpu(const float* spec, int64_t B, int64_t T, int64_t F, const int64_t* frames,
                   const float* fb, int64_t M, double power, bool to_db, double amin, double log_ref,
                   bool ref_max, bool use_top_db, double top_db, const float* dct, const float* lift,
                   int64_t K, float* mel_out, float* mfcc_out, int num_threads);

}  // namespace fastser
