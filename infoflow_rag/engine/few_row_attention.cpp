// Attention of a few query rows per K/V head over every cached key: a decoding step (one row per query head) and
// a question's scoring pass (its rows for each query head, under a mask, with the probabilities InfoFlow scores).
// Few rows give torch's CPU flash kernel one work item per query head, each a series of tiny products over the
// whole cache; here the keys are split into chunks shared out over the threads (as flash-decoding does on GPUs),
// each chunk's rows keep their own max, sum and output, and the chunks are merged at the end. K/V rows must be
// contiguous, their heads may sit anywhere: the decode cache's heads are views into a buffer with room to append.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <limits>
#include <vector>

namespace {

// Keys per work item: 17 items per K/V head at 4K keys, enough to keep 2 threads busy on 2-3 heads.
constexpr int64_t kKeyChunk = 256;
// Up to this many rows per K/V head, a chunk's products are dot products per key and row (a decoding step: 3 rows
// on SmolLM2, 7 on Qwen2.5-0.5B); more rows (a question's: 39 and 91) run two products on oneDNN's microkernel
// (`product` in kernels.h). Two MKL sgemm calls, which the products replaced (SmolLM2's scoring pass at 4K, 28
// layers' calls replayed alternating: 38.4 against 31.2 ms), ran 29 against the dot products' 29 ms per 30 layers at
// 13 rows, 37 against 49 at 26 and 47 against 77 at 39, and lost 2x at 3 and 7.
constexpr int64_t kDotRows = 16;

// w (G, keys) = q (G, d) k^T (keys, d) * scale, one dot product per key and row.
void dot_logits(const float* q, const float* k, float* w, int64_t G, int64_t keys, int64_t d, float scale) {
  for (int64_t j = 0; j < keys; ++j) {  // each key row read once for every query row
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.f;
      for (int64_t e = 0; e < d; ++e) dot += q[g * d + e] * k[j * d + e];
      w[g * keys + j] = dot * scale;
    }
  }
}

// out (G, d) = w (G, keys) v (keys, d), a key's value row read once for every query row.
void dot_weighted_values(const float* w, const float* v, float* out, int64_t G, int64_t keys, int64_t d) {
  std::fill(out, out + G * d, 0.f);
  for (int64_t j = 0; j < keys; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      const float wj = w[g * keys + j];
      for (int64_t e = 0; e < d; ++e) out[g * d + e] += wj * v[j * d + e];
    }
  }
}

}  // namespace

// q: (H, G, d), k and v: (H, M, d); mask: additive (R, M) with G % R == 0, or none. Returns softmax(q k^T scale +
// mask) v per head over all M keys (H, G, d) (empty without v), and the probabilities of keys [0, n_probs)
// (H, G, n_probs). Built with -ffast-math, so no infinity is ever formed: maxima start at the lowest float, and a
// key masked by the lowest float (torch.finfo(float32).min, the engine's masks) weighs 0.
std::vector<at::Tensor> few_row_attention(at::Tensor q, at::Tensor k, std::optional<at::Tensor> v,
                                          std::optional<at::Tensor> mask, double scale, int64_t n_probs) {
  check_cpu_float32("few_row_attention", {q, k});
  if (v) check_cpu_float32("few_row_attention", {*v});
  const at::IntArrayRef v_sizes = v ? v->sizes() : k.sizes(), v_strides = v ? v->strides() : k.strides();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v_sizes == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && k.size(1) > 0,
              "few_row_attention takes q (H, G, d) and k, v (H, M, d) with M > 0; got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v_sizes);
  TORCH_CHECK(k.stride(2) == 1 && v_strides[2] == 1 && k.stride(1) == k.size(2) && v_strides[1] == k.size(2),
              "few_row_attention needs k and v rows contiguous (strides (*, d, 1)); got k ", k.strides(), ", v ",
              v_strides);
  const int64_t H = q.size(0), G = q.size(1), d = q.size(2), M = k.size(1);
  TORCH_CHECK(0 <= n_probs && n_probs <= M, "n_probs must be within 0..", M, " (the keys); got ", n_probs);
  const float* mp = nullptr;
  int64_t R = 1, mask_stride = 0;
  if (mask) {
    check_cpu_float32("few_row_attention", {*mask});
    TORCH_CHECK(mask->dim() == 2 && mask->size(1) == M && mask->size(0) > 0 && G % mask->size(0) == 0 &&
                    mask->stride(1) == 1,
                "few_row_attention's mask must be (R, M) = (R, ", M, ") with ", G, " % R == 0 and contiguous rows; got ",
                mask->sizes(), " with strides ", mask->strides());
    mp = mask->data_ptr<float>();
    R = mask->size(0);
    mask_stride = mask->stride(0);
  }
  const int64_t chunks = (M + kKeyChunk - 1) / kKeyChunk, items = H * chunks;
  // Rows for the products: G padded to a multiple of kProductAlign with zero queries (whose outputs are dropped),
  // scaled once here, as the products take no scale factor. The dot products read q as it is.
  const bool dots = G <= kDotRows;
  const int64_t G_pad = dots ? G : product_aligned(G);
  if (dots) {
    q = q.contiguous();
  } else {
    auto q_pad = at::zeros({H, G_pad, d}, q.options());
    q_pad.narrow(1, 0, G).copy_(q).mul_(scale);
    q = q_pad.transpose(1, 2).contiguous();  // (H, d, G_pad): the logits' right operand, K chunks being the left
  }
  // Each item's partial softmax: its rows' max and sum over its keys, and their unnormalized output (G_pad, d).
  std::vector<float> part_max(items * G), part_sum(items * G), part_out(v ? items * G_pad * d : 0);
  auto probs = at::empty({n_probs > 0 ? H : 0, G, n_probs}, q.options());  // unnormalized until the merge
  float* pp = probs.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v ? v->data_ptr<float>() : nullptr;
  const int64_t k_head = k.stride(0), v_head = v ? v->stride(0) : 0;
  const float lowest = std::numeric_limits<float>::lowest(), s = static_cast<float>(scale);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    // (G_pad, keys) with rows `stride` apart: logits, then exp(logit - max). For the products: the logits as the
    // product gives them, (keys, G_pad), and the last chunk's keys and values where it ends off the product's
    // alignment (kKeyChunk, d). The products run over the keys rounded up: the keys' rows past the chunk give
    // logits never read, the values' rows there are zeros, so the weights' columns there (finite) add nothing.
    // The logits are taken as K q^T and transposed here, in cache: q K^T would need K transposed, a strided read of
    // every key from memory, which took a third of the kernel's time (SmolLM2's scoring pass at 4K).
    std::vector<float> weights(G_pad * kKeyChunk), logits_t(dots ? 0 : kKeyChunk * G_pad);
    std::vector<float> keys_pad(dots ? 0 : kKeyChunk * d), values_pad(dots ? 0 : kKeyChunk * d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t h = item / chunks, c0 = (item % chunks) * kKeyChunk, keys = std::min(kKeyChunk, M - c0);
      const float* kc = kp + h * k_head + c0 * d;
      float* w = weights.data();
      const int64_t cols = dots ? keys : product_aligned(keys);
      const int64_t stride = dots ? keys : kKeyChunk;
      if (dots) {
        dot_logits(qp + h * G * d, kc, w, G, keys, d, s);
      } else {
        if (cols > keys) {  // the chunk's rows may end the tensor: no row past them is read
          std::copy(kc, kc + keys * d, keys_pad.data());
          kc = keys_pad.data();
        }
        float* lt = logits_t.data();
        product(cols, G_pad, d, kc, d, qp + h * d * G_pad, G_pad, lt, G_pad, false);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t j = 0; j < keys; ++j) w[g * kKeyChunk + j] = lt[j * G_pad + g];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* row = w + g * stride;
        const float* mrow = mp ? mp + (g % R) * mask_stride + c0 : nullptr;
        if (mrow) {
          for (int64_t j = 0; j < keys; ++j) row[j] += mrow[j];
        }
        float top = lowest, sum = 0.f;
        for (int64_t j = 0; j < keys; ++j) top = std::max(top, row[j]);
        if (mrow) {  // a masked key weighs 0, also where every key of the chunk is masked (its top is then ~lowest)
          for (int64_t j = 0; j < keys; ++j) {
            row[j] = mrow[j] == lowest ? 0.f : exp_nonpositive(row[j] - top);
            sum += row[j];
          }
        } else {
          for (int64_t j = 0; j < keys; ++j) {
            row[j] = exp_nonpositive(row[j] - top);
            sum += row[j];
          }
        }
        part_max[item * G + g] = top;
        part_sum[item * G + g] = sum;
        if (c0 < n_probs) std::copy(row, row + std::min(keys, n_probs - c0), pp + (h * G + g) * n_probs + c0);
      }
      if (!vp) continue;
      const float* vc = vp + h * v_head + c0 * d;
      float* out = part_out.data() + item * G_pad * d;
      if (dots) {
        dot_weighted_values(w, vc, out, G, keys, d);
        continue;
      }
      if (cols > keys) {
        std::copy(vc, vc + keys * d, values_pad.data());
        std::fill(values_pad.data() + keys * d, values_pad.data() + cols * d, 0.f);
        vc = values_pad.data();
      }
      product(G_pad, d, cols, w, kKeyChunk, vc, d, out, d, false);
    }
  }
  // Merge the chunks: each weighs by exp(its max - the row's max) / the row's sum, so the softmax is over all M keys.
  // No values: the probabilities alone.
  auto result = v ? at::zeros({H, G, d}, q.options()) : at::empty({0}, q.options());
  float* rp = result.data_ptr<float>();
  std::vector<float> chunk_weight(items * G);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float top = lowest, sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part_max[(h * chunks + c) * G + g]);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = (h * chunks + c) * G + g;
        chunk_weight[i] = exp_nonpositive(part_max[i] - top);
        sum += part_sum[i] * chunk_weight[i];
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // 0: a row that sees no key at all gets a zero output
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = (h * chunks + c) * G + g;
        chunk_weight[i] *= inv;
        if (!vp) continue;
        float* row = rp + (h * G + g) * d;
        const float* part = part_out.data() + ((h * chunks + c) * G_pad + g) * d;
        for (int64_t e = 0; e < d; ++e) row[e] += chunk_weight[i] * part[e];
      }
    }
  }
  const int64_t prob_chunks = (n_probs + kKeyChunk - 1) / kKeyChunk;
  at::parallel_for(0, H * prob_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t it = first; it < last; ++it) {
      const int64_t h = it / prob_chunks, c = it % prob_chunks, c0 = c * kKeyChunk;
      const int64_t keys = std::min(kKeyChunk, n_probs - c0);
      for (int64_t g = 0; g < G; ++g) {
        const float f = chunk_weight[(h * chunks + c) * G + g];
        float* row = pp + (h * G + g) * n_probs + c0;
        for (int64_t j = 0; j < keys; ++j) row[j] *= f;
      }
    }
  });
  return {result, probs};
}
