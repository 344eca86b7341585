// Zero-skipping y = hardshrink(x, t) @ (Q * s) + b with int8 weights, on the CPU.
//
// Q is the weight quantized to int8, input-major, shape (in, out), contiguous:
// row i holds the bytes input i contributes to every output, so a zeroed input
// skips its whole row. s (out,) is one float32 scale per output channel
// (symmetric: w_ij = Q_ij * s_j), so the sum over the kept inputs is taken on
// the integers widened to float32 and scaled once per output at the end:
//
//   y_j = s_j * sum_i x_i Q_ij + b_j.
//
// Few tokens: the kept entries of each token are listed, the output columns
// are split across torch's threads, and each thread adds the kept rows into a
// float32 accumulator, eight rows per pass (eight sequential byte streams; the
// accumulator is loaded and stored once per eight rows). Each 16 (AVX-512) or
// 8 (AVX2) bytes are sign-extended to int32, converted to float32 and added
// with a fused multiply-add. The accumulator of a block of columns stays in
// L1; with several tokens the block is narrower, so that its weight bytes
// stay in L2 while every token reads them.
//
// Many tokens (path 3, which path 0 picks above kMatmulKeptRows):
// dequantize-then-matmul, slab by slab (quantized_kernel.h).

#include "../_common/quantized_kernel.h"

namespace {

namespace q = actsparse_quantized;

constexpr int kGroup = 8;
// columns per accumulator block: one token, and several tokens
constexpr int64_t kBlockOneToken = int64_t{1} << 40;
constexpr int64_t kBlockTokens = 256;

// acc[0, width) += sum over k < n of values[k] * w[rows[k] * out + (0, width)]
void add_rows_scalar(
    float* __restrict__ acc, const int8_t* w, int64_t out, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
  for (int64_t k = 0; k < n; ++k) {
    const int8_t* __restrict__ r = w + rows[k] * out;
    const float v = values[k];
    for (int64_t c = 0; c < width; ++c) {
      acc[c] += v * static_cast<float>(r[c]);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t kLanes = 16;
inline __m512 widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m512 vset(float v) { return _mm512_set1_ps(v); }
inline __m512 vfma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
using vec = __m512;
#define ACTSPARSE_VECTOR 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
inline __m256 widen(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256 vset(float v) { return _mm256_set1_ps(v); }
inline __m256 vfma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
using vec = __m256;
#define ACTSPARSE_VECTOR 1
#endif

#ifdef ACTSPARSE_VECTOR
void add_rows_vector(
    float* __restrict__ acc, const int8_t* w, int64_t out, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
  const int64_t whole = width / kLanes * kLanes;
  int64_t k = 0;
  for (; k + kGroup <= n; k += kGroup) {
    const int8_t* r[kGroup];
    vec v[kGroup];
#pragma GCC unroll 8
    for (int g = 0; g < kGroup; ++g) {
      r[g] = w + rows[k + g] * out;
      v[g] = vset(values[k + g]);
    }
    for (int64_t c = 0; c < whole; c += kLanes) {
      vec a = vload(acc + c);
#pragma GCC unroll 8
      for (int g = 0; g < kGroup; ++g) {
        a = vfma(v[g], widen(r[g] + c), a);
      }
      vstore(acc + c, a);
    }
    for (int64_t c = whole; c < width; ++c) {
      float sum = acc[c];
      for (int g = 0; g < kGroup; ++g) {
        sum += values[k + g] * static_cast<float>(r[g][c]);
      }
      acc[c] = sum;
    }
  }
  for (; k < n; ++k) {
    const int8_t* r = w + rows[k] * out;
    const vec v = vset(values[k]);
    for (int64_t c = 0; c < whole; c += kLanes) {
      vstore(acc + c, vfma(v, widen(r + c), vload(acc + c)));
    }
    for (int64_t c = whole; c < width; ++c) {
      acc[c] += values[k] * static_cast<float>(r[c]);
    }
  }
}
#endif

void add_rows(
    int64_t path, float* acc, const int8_t* w, int64_t out, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
#ifdef ACTSPARSE_VECTOR
  if (path == q::kVectorPath) {
    add_rows_vector(acc, w, out, rows, values, n, width);
    return;
  }
#endif
  add_rows_scalar(acc, w, out, rows, values, n, width);
}

at::Tensor sparse_columns(
    const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
    const std::optional<at::Tensor>& bias, double threshold, int64_t path) {
  const int64_t tokens = x2.size(0);
  const int64_t in = x2.size(1);
  const int64_t out = qweight.size(1);
  at::Tensor y = at::empty({tokens, out}, x2.options());
  const q::KeptEntries kept = q::kept_entries(x2.const_data_ptr<float>(), tokens, in, threshold);
  const int8_t* w = qweight.const_data_ptr<int8_t>();
  const float* s = scales.const_data_ptr<float>();
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* y_data = y.mutable_data_ptr<float>();
  const int64_t block = tokens == 1 ? kBlockOneToken : kBlockTokens;
  q::parallel_columns(out, kept.offsets[tokens] * out, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> acc(static_cast<size_t>(std::min(block, c_end - c_begin)));
    for (int64_t c0 = c_begin; c0 < c_end; c0 += block) {
      const int64_t width = std::min(block, c_end - c0);
      for (int64_t t = 0; t < tokens; ++t) {
        std::fill(acc.begin(), acc.begin() + width, 0.0f);
        const int64_t lo = kept.offsets[t];
        add_rows(
            path, acc.data(), w + c0, out, kept.rows.data() + lo, kept.values.data() + lo,
            kept.offsets[t + 1] - lo, width);
        float* y_row = y_data + t * out + c0;
        for (int64_t c = 0; c < width; ++c) {
          const float value = acc[c] * s[c0 + c];
          y_row[c] = b == nullptr ? value : value + b[c0 + c];
        }
      }
    }
  });
  return y;
}

void dequantize_into(
    at::Tensor& target, const at::Tensor& qweight, const at::Tensor& scales, int64_t c0,
    int64_t c1) {
  const int64_t in = qweight.size(0);
  const int64_t out = qweight.size(1);
  const int64_t width = c1 - c0;
  const int8_t* w = qweight.const_data_ptr<int8_t>();
  const float* s = scales.const_data_ptr<float>() + c0;
  float* dst = target.mutable_data_ptr<float>();
  const int64_t stride = target.stride(0);
  at::parallel_for(0, in, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)),
                   [&](int64_t i0, int64_t i1) {
                     for (int64_t i = i0; i < i1; ++i) {
                       const int8_t* r = w + i * out + c0;
                       float* d = dst + i * stride;
                       for (int64_t c = 0; c < width; ++c) {
                         d[c] = static_cast<float>(r[c]) * s[c];
                       }
                     }
                   });
}

void check_weights(const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(
      qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
          qweight.is_contiguous(),
      "int8_linear_cpu: qweight must be a contiguous int8 (in, out) CPU tensor");
  TORCH_CHECK(
      scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
          scales.size(0) == qweight.size(1) && scales.is_contiguous(),
      "int8_linear_cpu: scales must be a contiguous float32 (out,) CPU tensor");
}

// x (*, in) float32; qweight (in, out) int8; scales (out,) float32; bias (out,)
// float32 or None. path: see quantized_kernel.h (0 picks).
at::Tensor int8_linear_cpu(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
    const std::optional<at::Tensor>& bias, double threshold, int64_t path) {
  check_weights(qweight, scales);
  TORCH_CHECK(path >= 0 && path <= 3, "int8_linear_cpu: path must be 0, 1, 2 or 3");
  const int64_t in = qweight.size(0);
  const int64_t out = qweight.size(1);
  const at::Tensor x2 = q::tokens_of(x, in, "int8_linear_cpu");
  const std::optional<at::Tensor> b = q::bias_of(bias, out, "int8_linear_cpu");
  const std::vector<int64_t> shape = q::out_shape(x, out);
  if (x2.size(0) == 0 || out == 0) {
    return at::empty(shape, x.options());
  }
  const int64_t run_path = q::chosen_path(x2, threshold, path);
  if (run_path == q::kMatmulPath) {
    // hardshrink once, then the slabs: a NaN or inf kept entry meets the
    // dequantized weights as in the reference
    const at::Tensor shrunk = at::hardshrink(x2, threshold);
    return q::dequantized_matmul(shrunk, out, b, [&](at::Tensor& slab, int64_t c0, int64_t c1) {
             dequantize_into(slab, qweight, scales, c0, c1);
           })
        .view(shape);
  }
  return sparse_columns(x2, qweight, scales, b, threshold, run_path).view(shape);
}

// The float32 weights (in, col_end - col_begin) that columns [col_begin, col_end) stand for.
at::Tensor int8_dequantize_cpu(
    const at::Tensor& qweight, const at::Tensor& scales, int64_t col_begin, int64_t col_end) {
  check_weights(qweight, scales);
  TORCH_CHECK(
      0 <= col_begin && col_begin <= col_end && col_end <= qweight.size(1),
      "int8_dequantize_cpu: columns out of range");
  at::Tensor target =
      at::empty({qweight.size(0), col_end - col_begin}, scales.options().dtype(at::kFloat));
  dequantize_into(target, qweight, scales, col_begin, col_end);
  return target;
}

std::string int8_isa() { return q::compiled_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(actsparse_kernels, m) {
  m.def(
      "int8_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, float threshold, "
      "int path=0) -> Tensor");
  m.def(
      "int8_dequantize_cpu(Tensor qweight, Tensor scales, int col_begin, int col_end) -> Tensor");
  m.def("int8_isa() -> str", &int8_isa);
}

TORCH_LIBRARY_IMPL(actsparse_kernels, CPU, m) {
  m.impl("int8_linear_cpu", &int8_linear_cpu);
  m.impl("int8_dequantize_cpu", &int8_dequantize_cpu);
}
