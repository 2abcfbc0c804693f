// The compiled kernels bound in kernels.cpp; each lives in its own source file. They include ATen alone, not
// torch/extension.h (Python and pybind11 too), which only the binding needs: a source compiles in ~8 s instead of ~27.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <vector>

// Refuses, naming the kernel and the value, a tensor that is not float32 on the CPU: the Python wrappers send the
// kernels nothing else (kernels.for_tensors), so this guards direct calls.
inline void check_cpu_float32(const char* kernel, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), kernel, " runs on the CPU; got a tensor on ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, kernel, " takes float32 tensors; got ", t.scalar_type());
  }
}

// The attention kernels' products run on oneDNN's GEMM microkernel (brgemm) through torch, which JIT-compiles
// one kernel per shape and thread on first use and keeps it; where torch has no microkernel, the same call runs a
// plain GEMM. Callers round their shapes to a multiple of kProductAlign to keep the compiled shapes few.
constexpr int64_t kProductAlign = 16;

// n rounded up to a multiple of kProductAlign: a product's row or key count.
inline int64_t product_aligned(int64_t n) { return (n + kProductAlign - 1) / kProductAlign * kProductAlign; }

// Row-major C (m, n) = A (m, k) B (k, n), plus C if accumulate.
inline void product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
}

// 16 floats: one AVX-512 register, two AVX2 ones; the compiler lowers arithmetic on it to the machine's vectors.
typedef float Vec __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// An unaligned load of kLanes floats.
inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// exp(x) for x <= 0 in plain arithmetic the compiler vectorizes: x = n ln2 + r, exp(x) = 2^n p(r), with Cephes'
// expf polynomial (~1e-7 relative). Clamped at -87 so 2^n stays a normal float.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// sparse_kernel.cpp: q (H, R, d), k and v (H, M, d), limits (R,) ascending; row r attends to keys [0, limits[r]).
at::Tensor sparse_row_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor limits, double scale);

// few_row_attention.cpp: q (H, G, d), k and v (H, M, d) with contiguous rows; every row attends to all M keys under
// an optional additive mask (R, M), row g reading mask row g % R. Returns the output (H, G, d), empty without v, and
// the softmax probabilities of the first n_probs keys (H, G, n_probs), empty for n_probs = 0.
std::vector<at::Tensor> few_row_attention(at::Tensor q, at::Tensor k, std::optional<at::Tensor> v,
                                          std::optional<at::Tensor> mask, double scale, int64_t n_probs);

// few_row_linear.cpp: x (M, K) times weight (N, K) transposed, plus bias (N,): (M, N), for a few rows M.
at::Tensor few_row_linear(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias);

// key_rotation.cpp: out (L, H, n, d) = keys (L, H, n, d) rotated by R(delta) per token, from cos and sin (n, d).
void rotate_keys_into(at::Tensor out, at::Tensor keys, at::Tensor cos, at::Tensor sin);
