// A linear layer of a few input rows (the question's rows in a scoring pass, one row per decoded token, the
// first token's logits): y = x W^T + b with x (M, K), W (N, K). Such a product reads every weight once and does
// little with it, so its speed is how fast the weights stream from memory; MKL's sgemm streamed them at ~7-11
// GB/s for 1-13 rows on a 2-core EPYC, this kernel at ~14-28 GB/s. Each weight row is read once from memory
// and dotted with every input row in registers: tiles of 8 weight rows x 4 input rows, 16 floats at a time.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kWeightRows = 8;  // per tile; 4 and 2 streamed the weights slower (Zen 4, SmolLM2 shapes)
constexpr int64_t kInputRows = 4;   // per tile; larger tiles run out of registers

// y[m][n] = x[m] . w[n] for MB input rows (from x) and NB weight rows (from w), each of length K; y's rows are
// y_stride apart.
template <int MB, int NB>
void tile(const float* x, const float* w, float* y, int64_t y_stride, int64_t K) {
  Vec acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MB; ++m) acc[i][m] = Vec{};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = load(w + i * K + k);
    for (int m = 0; m < MB; ++m) {
      const Vec xv = load(x + m * K + k);
      for (int i = 0; i < NB; ++i) acc[i][m] += wv[i] * xv;
    }
  }
  for (int i = 0; i < NB; ++i) {
    for (int m = 0; m < MB; ++m) {
      float sum = 0.f;
      for (int64_t lane = 0; lane < kLanes; ++lane) sum += acc[i][m][lane];
      for (int64_t j = k; j < K; ++j) sum += w[i * K + j] * x[m * K + j];  // K past the last 16
      y[m * y_stride + i] = sum;
    }
  }
}

// Every input row against NB weight rows, kInputRows rows at a time.
template <int NB>
void weight_rows(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; m += kInputRows) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (std::min(kInputRows, M - m)) {
      case 4: tile<4, NB>(xm, w, ym, N, K); break;
      case 3: tile<3, NB>(xm, w, ym, N, K); break;
      case 2: tile<2, NB>(xm, w, ym, N, K); break;
      default: tile<1, NB>(xm, w, ym, N, K); break;
    }
  }
}

}  // namespace

at::Tensor few_row_linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  check_cpu_float32("few_row_linear", {x, weight});
  if (bias) check_cpu_float32("few_row_linear", {*bias});
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "few_row_linear takes x (M, K) and weight (N, K); got x ", x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "bias must be (N,) = (",
              weight.size(0), ",); got ", bias ? bias->sizes() : at::IntArrayRef{});
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kWeightRows - 1) / kWeightRows;
  // Weight row blocks split between torch's threads; each streams its own contiguous part of the weights.
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t n = b * kWeightRows;
      if (n + kWeightRows <= N) {
        weight_rows<kWeightRows>(xp, wp + n * K, yp + n, M, N, K);
      } else {
        for (int64_t r = n; r < N; ++r) weight_rows<1>(xp, wp + r * K, yp + r, M, N, K);
      }
    }
  });
  if (bias) y += *bias;
  return y;
}
