// CPU twin of fastser/features/post_triton.py: one pass per utterance over its complex STFT.
#include "mel_chain_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastser {
namespace {

struct Band {  // the nonzero bins [lo, hi) of one mel filter
  int64_t lo, hi;
};

std::vector<Band> filter_bands(const float* fb, int64_t M, int64_t F) {
  std::vector<Band> bands(M);
  for (int64_t m = 0; m < M; ++m) {
    int64_t lo = 0, hi = 0;
    for (int64_t f = 0; f < F; ++f) {
      if (fb[m * F + f] != 0.0f) {
        if (hi == 0) lo = f;
        hi = f + 1;
      }
    }
    bands[m] = {lo, hi};
  }
  return bands;
}

inline float power_of(float re, float im, double power) {
  const float p2 = re * re + im * im;
  if (power == 2.0) return p2;
  if (power == 1.0) return std::sqrt(p2);
  return p2 > 0.0f ? static_cast<float>(std::pow(static_cast<double>(p2), power * 0.5)) : 0.0f;
}

}  // namespace

void mel_chain_cpu(const float* spec, int64_t B, int64_t T, int64_t F, const int64_t* frames,
                   const float* fb, int64_t M, double power, bool to_db, double amin, double log_ref,
                   bool ref_max, bool use_top_db, double top_db, const float* dct, const float* lift,
                   int64_t K, float* mel_out, float* mfcc_out, int num_threads) {
  const std::vector<Band> bands = filter_bands(fb, M, F);
  const bool second_pass = to_db && (ref_max || use_top_db || dct != nullptr);
#pragma omp parallel num_threads(std::max(1, std::min<int>(num_threads, static_cast<int>(B))))
  {
    std::vector<float> p(F), v(M);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = std::min<int64_t>(frames[b], T);
      float* mel = mel_out + b * M * T;
      double item_max = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < n; ++t) {  // pass 1: power -> mel -> dB, tracking the item's max
        const float* x = spec + (b * T + t) * F * 2;
        if (power == 2.0) {
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) p[f] = x[2 * f] * x[2 * f] + x[2 * f + 1] * x[2 * f + 1];
        } else {
          for (int64_t f = 0; f < F; ++f) p[f] = power_of(x[2 * f], x[2 * f + 1], power);
        }
        for (int64_t m = 0; m < M; ++m) {
          float out = 0.0f;  // float sums in a fixed order: fast, vectorised, and the same for any batch
          const float* w = fb + m * F;
#pragma omp simd reduction(+ : out)
          for (int64_t f = bands[m].lo; f < bands[m].hi; ++f) out += w[f] * p[f];
          if (to_db) {
            out = 10.0f * std::log10(std::max(out, static_cast<float>(amin)));
            item_max = std::max(item_max, static_cast<double>(out));
            out -= static_cast<float>(log_ref);
          }
          mel[m * T + t] = out;
        }
      }
      for (int64_t m = 0; m < M; ++m) std::fill(mel + m * T + n, mel + (m + 1) * T, 0.0f);
      if (!second_pass) continue;
      // ref = max: shift by the item's max (log_ref is 0 then); else the max after pass 1's shift
      const float shift = ref_max ? static_cast<float>(item_max) : 0.0f;
      const float floor_db = static_cast<float>((ref_max ? 0.0 : item_max - log_ref) - top_db);
      float* cep = mfcc_out ? mfcc_out + b * K * T : nullptr;
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t m = 0; m < M; ++m) {
          float val = mel[m * T + t] - shift;
          if (use_top_db) val = std::max(val, floor_db);
          mel[m * T + t] = v[m] = val;
        }
        if (!cep) continue;
        for (int64_t k = 0; k < K; ++k) {
          float acc = 0.0f;
          const float* basis = dct + k * M;
#pragma omp simd reduction(+ : acc)
          for (int64_t m = 0; m < M; ++m) acc += basis[m] * v[m];
          cep[k * T + t] = acc * lift[k];
        }
      }
      if (cep)
        for (int64_t k = 0; k < K; ++k) std::fill(cep + k * T + n, cep + (k + 1) * T, 0.0f);
    }
  }
}

}  // namespace fastser
