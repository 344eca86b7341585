// What the weight-only quantized zero-skipping kernels share (cpu_sparse_int8,
// cpu_sparse_int4): listing the kept entries of the input, splitting the
// output columns across threads, the dequantize-then-matmul path for many
// tokens, and which vector path the build compiled.
//
// The weights are stored input-major: row i holds what input i contributes to
// every output, so a zeroed input skips its whole row of bytes. An input entry
// is kept iff !(|x_i| <= t) (t rounded to float32, as hardshrink does), so NaN
// and inf are kept and propagate as in the dense product. Activations are
// float32 and every sum is accumulated in float32.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace actsparse_quantized {

// The vector path this build compiled: the widest of AVX-512, AVX2 and the
// portable scalar loops, chosen by the compiler's target macros (-march=native).
inline std::string compiled_isa() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

// path argument of the operators: 0 picks by the kept entries (below), 1 the
// compiled vector loops, 2 the scalar loops (the same results up to the order
// of float sums; tests compare the two), 3 dequantize-then-matmul.
constexpr int64_t kAutoPath = 0;
constexpr int64_t kVectorPath = 1;
constexpr int64_t kScalarPath = 2;
constexpr int64_t kMatmulPath = 3;

// Path 0 takes dequantize-then-matmul once the kept entries of all tokens
// together exceed this many times in_features (8 tokens at 0% sparsity, 16
// at 50%): where it overtook the zero-skipping loops on Llama-7B shapes
// (docs/kernels.md).
constexpr int64_t kMatmulKeptRows = 8;

// The path that path 0 stands for on x2 (tokens, in).
inline int64_t chosen_path(const at::Tensor& x2, double threshold, int64_t path) {
  if (path != kAutoPath) {
    return path;
  }
  const float limit = static_cast<float>(threshold);
  const float* x = x2.const_data_ptr<float>();
  const int64_t n = x2.numel();
  const int64_t most = kMatmulKeptRows * x2.size(1);
  int64_t kept = 0;
  for (int64_t k = 0; k < n; ++k) {
    kept += !(std::fabs(x[k]) <= limit);
  }
  return kept > most ? kMatmulPath : kVectorPath;
}

// Below this many multiply-adds the product runs on one thread.
constexpr int64_t kMinParallelWork = 1 << 16;
// Parallel chunks of output columns start on multiples of this (whole
// int4 groups, whole vectors).
constexpr int64_t kColumnUnit = 64;

// The kept entries of x (tokens x in), token by token: those of token t are
// [offsets[t], offsets[t + 1]), input indices ascending.
struct KeptEntries {
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
  std::vector<float> values;
};

inline KeptEntries kept_entries(const float* x, int64_t tokens, int64_t in, double threshold) {
  const float limit = static_cast<float>(threshold);
  KeptEntries kept;
  kept.offsets.reserve(tokens + 1);
  kept.offsets.push_back(0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * in;
    for (int64_t i = 0; i < in; ++i) {
      // a negation, so that NaN (every comparison false) is kept
      if (!(std::fabs(row[i]) <= limit)) {
        kept.rows.push_back(i);
        kept.values.push_back(row[i]);
      }
    }
    kept.offsets.push_back(static_cast<int64_t>(kept.rows.size()));
  }
  return kept;
}

// fn(col_begin, col_end) on chunks of [0, out) split across torch's threads;
// `work` is the number of multiply-adds in all (it sets the grain).
template <typename Fn>
void parallel_columns(int64_t out, int64_t work, const Fn& fn) {
  const int64_t units = (out + kColumnUnit - 1) / kColumnUnit;
  const int64_t work_per_unit = std::max<int64_t>(1, work / std::max<int64_t>(1, units));
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / work_per_unit);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    fn(u0 * kColumnUnit, std::min(u1 * kColumnUnit, out));
  });
}

// The arguments every quantized operator checks: x (*, in) float32 on the CPU,
// bias (out,) float32 or None. Returns x as a contiguous (tokens, in) tensor.
inline at::Tensor tokens_of(const at::Tensor& x, int64_t in, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": x must be (*, ", in, "), got ", x.sizes());
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    tokens *= x.size(d);
  }
  return x.reshape({tokens, in}).contiguous();
}

inline std::optional<at::Tensor> bias_of(
    const std::optional<at::Tensor>& bias, int64_t out, const char* op) {
  if (!bias.has_value() || !bias->defined()) {
    return std::nullopt;
  }
  TORCH_CHECK(
      bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
          bias->size(0) == out,
      op, ": bias must be a float32 (", out, ",) CPU tensor");
  return bias->contiguous();
}

// The output's shape: x's leading dimensions, then out.
inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return shape;
}

// Many tokens: dequantize a slab of output columns at a time into a float32
// (in, width) buffer and multiply with torch's matrix product, so the float
// weights never exist in full. dequantize(buffer, col_begin, col_end) fills
// the buffer. Returns (tokens, out).
template <typename Dequantize>
at::Tensor dequantized_matmul(
    const at::Tensor& x2, int64_t out, const std::optional<at::Tensor>& bias,
    const Dequantize& dequantize) {
  const int64_t tokens = x2.size(0);
  const int64_t in = x2.size(1);
  // about 8 MiB of float32 weights per slab, at least 256 columns: fewer and
  // larger products for torch's matmul, whole column units
  const int64_t width = std::max<int64_t>(
      4 * kColumnUnit,
      ((int64_t{1} << 21) / std::max<int64_t>(1, in)) / kColumnUnit * kColumnUnit);
  at::Tensor y_t = at::empty({out, tokens}, x2.options());
  at::Tensor buffer = at::empty({in, width}, x2.options());
  const at::Tensor x_t = x2.t();
  for (int64_t c0 = 0; c0 < out; c0 += width) {
    const int64_t c1 = std::min(out, c0 + width);
    at::Tensor slab = buffer.narrow(1, 0, c1 - c0);
    dequantize(slab, c0, c1);
    at::Tensor target = y_t.narrow(0, c0, c1 - c0);
    at::mm_out(target, slab.t(), x_t);
  }
  at::Tensor y = y_t.t().contiguous();
  if (bias.has_value()) {
    y.add_(*bias);
  }
  return y;
}

}  // namespace actsparse_quantized
