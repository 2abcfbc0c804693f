// The compiled kernels bound in kernels.cpp; each lives in its own source file.
#pragma once

#include <torch/extension.h>

#include <optional>

// sparse_kernel.cpp: q (H, R, d), k and v (H, M, d), limits (R,) ascending; row r attends to keys [0, limits[r]).
torch::Tensor sparse_row_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor limits,
                                   double scale);

// few_row_linear.cpp: x (M, K) times weight (N, K) transposed, plus bias (N,): (M, N), for a few rows M.
torch::Tensor few_row_linear(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> bias);
