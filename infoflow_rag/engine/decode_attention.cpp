// Attention of one decoding step: each K/V head's group of query rows (one per query head) over every cached key.
// A few rows give torch's CPU flash kernel one work item per query head, each a series of tiny products over the
// whole cache; here the keys are split into chunks shared out over the threads (as flash-decoding does on GPUs),
// each chunk's rows keep their own max, sum and output, and the chunks are merged at the end. K/V rows must be
// contiguous, their heads may sit anywhere: the decode cache's heads are views into a buffer with room to append.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <limits>
#include <vector>

namespace {

// Keys per work item: 17 items per K/V head at 4K keys, enough to keep 2 threads busy on 3 heads.
constexpr int64_t kKeyChunk = 256;

}  // namespace

// q: (H, G, d), k and v: (H, M, d). Returns softmax(q k^T scale) v per head over all M keys: (H, G, d). Built with
// -ffast-math, so no infinity is ever formed: maxima start at the lowest float.
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  check_cpu_float32("decode_attention", {q, k, v});
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && k.size(1) > 0,
              "decode_attention takes q (H, G, d) and k, v (H, M, d) with M > 0; got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "decode_attention needs k and v rows contiguous (strides (*, d, 1)); got k ", k.strides(), ", v ",
              v.strides());
  q = q.contiguous();
  const int64_t H = q.size(0), G = q.size(1), d = q.size(2), M = k.size(1);
  const int64_t chunks = (M + kKeyChunk - 1) / kKeyChunk, items = H * chunks;
  // Each item's partial softmax: its rows' max and sum over its keys, and their unnormalized output.
  std::vector<float> part_max(items * G), part_sum(items * G), part_out(items * G * d);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t k_head = k.stride(0), v_head = v.stride(0);
  const float lowest = std::numeric_limits<float>::lowest(), s = static_cast<float>(scale);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> weights(G * kKeyChunk);  // (G, keys): logits, then exp(logit - max)
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t h = item / chunks, c0 = (item % chunks) * kKeyChunk, keys = std::min(kKeyChunk, M - c0);
      const float* kc = kp + h * k_head + c0 * d;
      const float* vc = vp + h * v_head + c0 * d;
      const float* qh = qp + h * G * d;
      for (int64_t j = 0; j < keys; ++j) {  // each key row read once for every query row
        for (int64_t g = 0; g < G; ++g) {
          float dot = 0.f;
          for (int64_t e = 0; e < d; ++e) dot += qh[g * d + e] * kc[j * d + e];
          weights[g * kKeyChunk + j] = dot * s;
        }
      }
      float* out = part_out.data() + item * G * d;
      std::fill(out, out + G * d, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* w = weights.data() + g * kKeyChunk;
        float top = lowest, sum = 0.f;
        for (int64_t j = 0; j < keys; ++j) top = std::max(top, w[j]);
        for (int64_t j = 0; j < keys; ++j) {
          w[j] = exp_nonpositive(w[j] - top);
          sum += w[j];
        }
        part_max[item * G + g] = top;
        part_sum[item * G + g] = sum;
      }
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t g = 0; g < G; ++g) {
          const float w = weights[g * kKeyChunk + j];
          for (int64_t e = 0; e < d; ++e) out[g * d + e] += w * vc[j * d + e];
        }
      }
    }
  }
  // Merge the chunks: each weighs by exp(its max - the row's max), so the softmax is over all M keys.
  auto result = at::zeros_like(q);
  float* rp = result.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float top = lowest, sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part_max[(h * chunks + c) * G + g]);
      float* row = rp + (h * G + g) * d;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = (h * chunks + c) * G + g;
        const float w = exp_nonpositive(part_max[i] - top);
        sum += part_sum[i] * w;
        const float* part = part_out.data() + i * d;
        for (int64_t e = 0; e < d; ++e) row[e] += w * part[e];
      }
      const float inv = 1.f / sum;
      for (int64_t e = 0; e < d; ++e) row[e] *= inv;
    }
  }
  return result;
}
