// Attention of sparse query rows, each over the key prefix its position sees: row r reads keys [0, limits[r]).
// The rows are sorted by position (the recompute's queries; full prefill's, every position), so a block of rows
// needs no key past its last row's limit and no mask before its first row's: no key block past a row block's last
// limit is computed, which torch's CPU flash kernel cannot skip under an explicit mask, and within the block's keys
// a row's keys past its own limit are zeroed. The blocks run as torch's flash kernel runs its own: two sgemm calls
// and an online softmax.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// Rows per block and keys per block: on one SmolLM2 layer at InfoFlow's 4K picks (1953 folded rows), 64-256 x
// 256-1024 all ran within the run-to-run noise of 128 x 512, the sizes torch's flash kernel uses for long inputs.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kKeyBlock = 512;

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
  q = q.contiguous();
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
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t k_head = k.stride(0), v_head = v.stride(0);
  float* op = out.data_ptr<float>();
  const int64_t n_blocks = (R + kRowBlock - 1) / kRowBlock, items = H * n_blocks;
  const float lowest = std::numeric_limits<float>::lowest();
  // torch's OpenMP threads; the sgemm calls inside run on one thread each, as MKL does inside a parallel region
  // (unless nested parallelism is turned on, e.g. OMP_MAX_ACTIVE_LEVELS > 1).
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores(kRowBlock * kKeyBlock), row_max(kRowBlock), row_sum(kRowBlock);
    // Later row blocks see more keys: hand them out first, dynamically, so the threads finish together.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t block = n_blocks - 1 - item / H, h = item % H;
      const int64_t r0 = block * kRowBlock, rows = std::min(kRowBlock, R - r0);
      const int64_t* lim = lim_all + r0;
      const float* qb = qp + (h * R + r0) * d;
      float* o = op + (h * R + r0) * d;  // (rows, d) accumulates P V, rescaled as each row's max grows
      std::fill(o, o + rows * d, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, lowest);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      for (int64_t c = 0; c < lim[rows - 1]; c += kKeyBlock) {
        const int64_t keys = std::min(kKeyBlock, lim[rows - 1] - c);
        float* s = scores.data();  // (rows, keys) row-major = column-major (keys, rows)
        gemm('T', 'N', keys, rows, d, static_cast<float>(scale), kp + h * k_head + c * d, d, qb, d, 0.f, s, keys);
        for (int64_t i = 0; i < rows; ++i) {
          float* row = s + i * keys;
          const int64_t seen = std::clamp<int64_t>(lim[i] - c, 0, keys);
          float top = row_max[i];
          for (int64_t j = 0; j < seen; ++j) top = std::max(top, row[j]);
          float sum = 0.f;
          for (int64_t j = 0; j < seen; ++j) {
            row[j] = exp_nonpositive(row[j] - top);
            sum += row[j];
          }
          std::fill(row + seen, row + keys, 0.f);
          if (seen == 0) continue;
          const float rescale = exp_nonpositive(row_max[i] - top);
          row_sum[i] = row_sum[i] * rescale + sum;
          row_max[i] = top;
          if (rescale != 1.f) {
            float* orow = o + i * d;
            for (int64_t j = 0; j < d; ++j) orow[j] *= rescale;
          }
        }
        gemm('N', 'N', d, rows, keys, 1.f, vp + h * v_head + c * d, d, s, keys, 1.f, o, d);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.f / row_sum[i];
        float* orow = o + i * d;
        for (int64_t j = 0; j < d; ++j) orow[j] *= inv;
      }
    }
  }
  return out;
}
