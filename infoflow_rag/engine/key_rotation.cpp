// Placement's key rotation in one pass: a passage's cached keys, stored post-RoPE at local positions, moved to their
// prompt positions by R(delta) and written into the prompt's key buffer, k cos + rotate_half(k) sin for each row.
// torch's ops take three passes over the keys for it (a product and two in-place multiply-adds on halves), each a
// pass over memory (~90 MB of keys at 4K on SmolLM2); this reads each key once and writes it once, with
// non-temporal stores where the machine has them, so a write does not first read the line it replaces: the 4K
// rotation took ~5.5 ms, as long as copying the keys, against ~12.5 ms for torch's three passes.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Writes kLanes floats to p, bypassing the caches where p is 64-byte aligned (the buffer's rows are).
inline void stream_store(float* p, Vec v) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    __m512 m;
    std::memcpy(&m, &v, sizeof m);
    _mm512_stream_ps(p, m);
    return;
  }
#endif
  std::memcpy(p, &v, sizeof v);
}

// Orders the streamed stores before the thread's work is seen as done (they are weakly ordered).
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

}  // namespace

// keys (L, H, n, d) and out (L, H, n, d) with contiguous rows (out a view into the prompt's buffer: its heads sit
// further apart); cos and sin (n, d), one row per token, row stride 0 where every token shares one delta. Writes
// out[.., t, i] = k[i] cos[t, i] - k[i + d/2] sin[t, i] for i < d/2 and k[i] cos[t, i] + k[i - d/2] sin[t, i] above.
void rotate_keys_into(at::Tensor out, at::Tensor keys, at::Tensor cos, at::Tensor sin) {
  check_cpu_float32("rotate_keys_into", {out, keys, cos, sin});
  TORCH_CHECK(keys.dim() == 4 && out.sizes() == keys.sizes(),
              "rotate_keys_into takes keys and out (L, H, n, d) of one shape; got keys ", keys.sizes(), " and out ",
              out.sizes());
  const int64_t L = keys.size(0), H = keys.size(1), n = keys.size(2), d = keys.size(3), half = d / 2;
  TORCH_CHECK(d % 2 == 0 && cos.dim() == 2 && cos.size(0) == n && cos.size(1) == d && sin.sizes() == cos.sizes() &&
                  sin.strides() == cos.strides() && cos.stride(1) == 1,
              "cos and sin must be (n, d) = (", n, ", ", d, ") with contiguous rows and one layout; got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(out.stride(3) == 1 && out.stride(2) == d, "out's rows must be contiguous; got strides ", out.strides());
  keys = keys.contiguous();
  const float* kp = keys.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t trig_row = cos.stride(0), out_layer = out.stride(0), out_head = out.stride(1);
  at::parallel_for(0, L * H, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const float* k_head = kp + item * n * d;
      float* o_head = op + (item / H) * out_layer + (item % H) * out_head;
      for (int64_t t = 0; t < n; ++t) {
        const float* k = k_head + t * d;
        const float* c = cp + t * trig_row;
        const float* s = sp + t * trig_row;
        float* o = o_head + t * d;
        int64_t i = 0;
        for (; i + kLanes <= half; i += kLanes) {
          const Vec lo = load(k + i), hi = load(k + i + half);
          stream_store(o + i, lo * load(c + i) - hi * load(s + i));
          stream_store(o + i + half, hi * load(c + i + half) + lo * load(s + i + half));
        }
        for (; i < half; ++i) {  // a head size that is not a multiple of 2 * kLanes
          const float lo = k[i], hi = k[i + half];
          o[i] = lo * c[i] - hi * s[i];
          o[i + half] = hi * c[i + half] + lo * s[i + half];
        }
      }
    }
    stream_fence();
  });
}
