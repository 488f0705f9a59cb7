// Compact weights with activations quantized to 8-bit blocks (llama.cpp's Q8 numerics): the
// matmul, the weight layout it reads, and that layout's way back to the file's values.
// Defined in q8_activations.cpp; kind: 0 = Q4_1, 1 = Q8_0 (quant_matmul.cpp's Kind values).
#pragma once
#include <torch/extension.h>

namespace hasten_q8 {

// GGUF blocks [N, K / 32 * block bytes] -> the kernel's layout, the same shape (uint8).
torch::Tensor pack(const torch::Tensor& blocks, int64_t kind, int64_t K);

// The packed layout -> float32 [N, K]: the file's dequantized weights, bit for bit.
torch::Tensor unpack(const torch::Tensor& packed, int64_t kind, int64_t K);

// x [M, K] float32 @ W.T with each row of x rounded to int8 blocks of 32 (one float32 scale
// each) and W in the packed layout; integer dot products per block.
torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor& packed, int64_t kind);

bool has_vnni();

}  // namespace hasten_q8
