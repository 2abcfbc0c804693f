// Attention of sparse query rows, each over the key prefix its position sees: row r reads keys [0, limits[r]).
// The rows are sorted by position (the recompute's queries; full prefill's, every position), so a block of rows
// needs no key past its last row's limit and no mask before its first row's: no key block past a row block's last
// limit is computed, which torch's CPU flash kernel cannot skip under an explicit mask, and within the block's keys
// a row's keys past its own limit are zeroed. The blocks run as torch's flash kernel runs its own (two products and
// an online softmax), the products on oneDNN's GEMM microkernel (see `product` in kernels.h).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// Rows per block and keys per block: on one SmolLM2 layer at InfoFlow's 4K picks (1953 folded rows), 64-256 x
// 256-1024 all ran within the run-to-run noise of 128 x 512, the sizes torch's flash kernel uses for long inputs
// (measured with MKL's sgemm). On the microkernel, 64-row blocks ran a 4K query's 30 recompute calls 1 % faster and
// full prefill's 1.4 % slower (replayed alternating; README, "Tried and not kept").
constexpr int64_t kRowBlock = 128;
constexpr int64_t kKeyBlock = 512;
// Keys per step where the block's rows stop seeing keys (the block's diagonal): rows that see none of a step's keys
// are left out of its products, so a row block whose positions spread over many keys (the recompute's: 43 positions
// over ~290 keys at 15 % on SmolLM2) computes few keys no row sees.
constexpr int64_t kDiagonalStep = 128;

}  // namespace

// q: (H, R, d), k and v: (H, M, d), limits: (R,) int64 ascending in 1..M. Returns softmax(q k^T scale) v per head
// with row r over keys [0, limits[r]): (H, R, d). Built with -ffast-math, so no infinity is ever formed: the
// running max starts at the lowest float, and a key past a row's limit is zeroed instead of set to -inf.
at::Tensor sparse_row_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor limits, double scale) {
  check_cpu_float32("sparse_row_attention", {q, k, v});
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2),
              "sparse_row_attention takes q (H, R, d) and k, v (H, M, d); got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(limits.device().is_cpu() && limits.scalar_type() == at::kLong && limits.dim() == 1 &&
                  limits.size(0) == q.size(1),
              "limits must be int64 (R,) = (", q.size(1), ",) on the CPU; got ", limits.scalar_type(), " ",
              limits.sizes(), " on ", limits.device());
  // K/V heads may sit anywhere (the recompute's are views into buffers with room for the answer); rows are read whole.
  if (k.stride(2) != 1 || k.stride(1) != k.size(2)) k = k.contiguous();
  if (v.stride(2) != 1 || v.stride(1) != v.size(2)) v = v.contiguous();
  limits = limits.contiguous();
  const int64_t H = q.size(0), R = q.size(1), d = q.size(2), M = k.size(1);
  const int64_t* lim_all = limits.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(lim_all[r] >= 1 && lim_all[r] <= M && (r == 0 || lim_all[r] >= lim_all[r - 1]),
                "limits must ascend within 1..", M, "; row ", r, " has ", lim_all[r]);
  }
  if (R == 0) return at::empty_like(q);
  // Rows padded to a multiple of kProductAlign (zero queries that see what the last row sees, dropped at the end),
  // and scaled once here: the products take no scale factor.
  const int64_t R_pad = product_aligned(R);
  auto q_pad = at::zeros({H, R_pad, d}, q.options());
  q_pad.narrow(1, 0, R).copy_(q).mul_(scale);
  std::vector<int64_t> lim_pad(lim_all, lim_all + R);
  lim_pad.resize(R_pad, lim_all[R - 1]);
  auto out = at::empty({H, R_pad, d}, q.options());
  const int64_t last = lim_all[R - 1], n_key_blocks = (last + kKeyBlock - 1) / kKeyBlock;
  // K transposed per key block, the score product's right operand: (H, key block, d, kKeyBlock), zero past the last
  // key any row sees, so a product over a key count rounded up to kProductAlign reads zeros there. Once per call, read
  // by every row block: ~11 ms over a 4K query's 30 layers, the same for full prefill (16 x 16 tiles were no faster).
  auto kt = at::empty({H, n_key_blocks, d, kKeyBlock}, q.options());
  // V's last key block, if it ends past the last key, copied and zero-padded: (H, kKeyBlock, d). Every product of
  // P V then runs over the same key count rounded up, which keeps a row's sum the same for any block it sits in (a
  // product's sum is grouped once; two products, of the aligned keys and the rest, would split it where the block's
  // last row happens to end).
  const int64_t last_block = (n_key_blocks - 1) * kKeyBlock;
  const bool pad_v = last_block + kKeyBlock > last;
  auto v_last = at::zeros({pad_v ? H : 0, kKeyBlock, d}, q.options());
  const float* qp = q_pad.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* ktp = kt.data_ptr<float>();
  float* vlp = v_last.data_ptr<float>();
  const int64_t k_head = k.stride(0), v_head = v.stride(0);
  float* op = out.data_ptr<float>();
  const int64_t n_blocks = (R_pad + kRowBlock - 1) / kRowBlock, items = H * n_blocks;
  const float lowest = std::numeric_limits<float>::lowest();
  // torch's OpenMP threads; each product inside runs on its calling thread.
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for
    for (int64_t item = 0; item < H * n_key_blocks; ++item) {
      const int64_t h = item / n_key_blocks, c = (item % n_key_blocks) * kKeyBlock;
      const int64_t keys = std::min(kKeyBlock, last - c);
      const float* src = kp + h * k_head + c * d;
      float* dst = ktp + item * d * kKeyBlock;
      for (int64_t e = 0; e < d; ++e) {
        float* row = dst + e * kKeyBlock;
        for (int64_t j = 0; j < keys; ++j) row[j] = src[j * d + e];
        std::fill(row + keys, row + kKeyBlock, 0.f);
      }
      if (pad_v && c == last_block) {
        std::copy(vp + h * v_head + c * d, vp + h * v_head + last * d, vlp + h * kKeyBlock * d);
      }
    }  // the implied barrier: every block is transposed before any is read
    std::vector<float> scores(kRowBlock * kKeyBlock), row_max(kRowBlock), row_sum(kRowBlock);
    // Later row blocks see more keys: hand them out first, dynamically, so the threads finish together.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t block = n_blocks - 1 - item / H, h = item % H;
      const int64_t r0 = block * kRowBlock, rows = std::min(kRowBlock, R_pad - r0);
      const int64_t* lim = lim_pad.data() + r0;
      const float* qb = qp + (h * R_pad + r0) * d;
      float* o = op + (h * R_pad + r0) * d;  // (rows, d) accumulates P V, rescaled as each row's max grows
      std::fill(o, o + rows * d, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, lowest);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      int64_t first = 0;  // rows before it see none of this step's keys, nor any later step's
      for (int64_t c = 0, keys = 0; c < lim[rows - 1]; c += keys) {
        while (lim[first] <= c) ++first;
        int64_t step = kKeyBlock - c % kKeyBlock;  // to the end of this transposed key block
        if (lim[first] < c + step) step = std::min(step, kDiagonalStep);
        keys = std::min(step, lim[rows - 1] - c);
        const int64_t from = first / kProductAlign * kProductAlign, n = rows - from;
        float* s = scores.data() + from * kKeyBlock;  // (n, kKeyBlock): rows from..rows-1
        const int64_t cols = product_aligned(keys);
        const float* ktb = ktp + (h * n_key_blocks + c / kKeyBlock) * d * kKeyBlock + c % kKeyBlock;
        product(n, cols, d, qb + from * d, d, ktb, kKeyBlock, s, kKeyBlock, false);
        for (int64_t i = from; i < rows; ++i) {
          float* row = scores.data() + i * kKeyBlock;
          const int64_t seen = std::clamp<int64_t>(lim[i] - c, 0, keys);
          float top = row_max[i];
          for (int64_t j = 0; j < seen; ++j) top = std::max(top, row[j]);
          float sum = 0.f;
          for (int64_t j = 0; j < seen; ++j) {
            row[j] = exp_nonpositive(row[j] - top);
            sum += row[j];
          }
          std::fill(row + seen, row + cols, 0.f);
          if (seen == 0) continue;
          const float rescale = exp_nonpositive(row_max[i] - top);
          row_sum[i] = row_sum[i] * rescale + sum;
          row_max[i] = top;
          if (rescale != 1.f) {
            float* orow = o + i * d;
            for (int64_t j = 0; j < d; ++j) orow[j] *= rescale;
          }
        }
        const float* vb =
            pad_v && c >= last_block ? vlp + (h * kKeyBlock + c - last_block) * d : vp + h * v_head + c * d;
        product(n, d, cols, s, kKeyBlock, vb, d, o + from * d, d, true);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.f / row_sum[i];
        float* orow = o + i * d;
        for (int64_t j = 0; j < d; ++j) orow[j] *= inv;
      }
    }
  }
  return out.narrow(1, 0, R);
}
