// Zero-skipping y = hardshrink(x, t) @ W + b with 4-bit weights, on the CPU.
//
// W is stored input-major and group-wise along the output dimension: row i
// (input i) is cut into groups of 32 consecutive outputs, and group g of row
// i has a bfloat16 scale d_ig and an integer zero point z_ig in [0, 15]:
//
//   w_ij = d_ig * (q_ij - z_ig),   q_ij in [0, 15],   g = j / 32.
//
// qweight (in, out_pad / 2) uint8 packs a group's 32 values in 16 bytes: byte
// k holds q_k in its low nibble and q_{k+16} in its high nibble. scales (in,
// out_pad / 32) bfloat16, zeros (in, out_pad / 32) uint8. out_pad is out
// rounded up to 32 (padding columns are zero and never returned). A zeroed
// input skips its row: its bytes, scales and zero points.
//
// For each kept input the kernel forms x_i * d_ig in float32, and adds
// (x_i d_ig) * (q_ij - z_ig) into a float32 accumulator: the integers are
// unpacked, the zero point subtracted exactly in int32, then converted and
// added with a fused multiply-add. Eight rows go per pass over the
// accumulator, as for int8. Many tokens: dequantize-then-matmul.

#include "../_common/quantized_kernel.h"

namespace {

namespace q = actsparse_quantized;

constexpr int64_t kGroupSize = 32;
constexpr int kRows = 8;
constexpr int64_t kBlockOneToken = int64_t{1} << 40;
constexpr int64_t kBlockTokens = 256;

// a bfloat16's bits, widened to float32 (exact)
inline float scale_of(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

struct Int4Weights {
  const uint8_t* packed;   // (in, out_pad / 2)
  const uint16_t* scales;  // (in, groups) bfloat16 bits
  const uint8_t* zeros;    // (in, groups)
  int64_t out_pad;
  int64_t groups;
};

inline int64_t nibble(const uint8_t* group_bytes, int64_t k) {
  return k < 16 ? (group_bytes[k] & 0x0F) : (group_bytes[k - 16] >> 4);
}

// acc[0, width) += sum over k of x_k * w[rows[k], c0 + (0, width)], width whole groups.
void add_rows_scalar(
    float* __restrict__ acc, const Int4Weights& w, int64_t c0, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
  const int64_t g0 = c0 / kGroupSize;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = rows[k];
    const uint8_t* row = w.packed + i * (w.out_pad / 2);
    for (int64_t g = 0; g < width / kGroupSize; ++g) {
      const float xd = values[k] * scale_of(w.scales[i * w.groups + g0 + g]);
      const int64_t z = w.zeros[i * w.groups + g0 + g];
      const uint8_t* bytes = row + (g0 + g) * (kGroupSize / 2);
      float* a = acc + g * kGroupSize;
      for (int64_t j = 0; j < kGroupSize; ++j) {
        a[j] += xd * static_cast<float>(nibble(bytes, j) - z);
      }
    }
  }
}

// For `count` kept rows: where their bytes of group g0 start (r), and for
// each of their `groups` groups x_i * d_ig (xd) and z_ig (zero), row-major.
template <typename Z>
inline void prepare_rows(
    const Int4Weights& w, int64_t g0, int64_t groups, const int64_t* rows, const float* values,
    int count, const uint8_t** r, float* xd, Z* zero) {
  for (int k = 0; k < count; ++k) {
    const int64_t i = rows[k];
    r[k] = w.packed + i * (w.out_pad / 2) + g0 * (kGroupSize / 2);
    const uint16_t* s = w.scales + i * w.groups + g0;
    const uint8_t* z = w.zeros + i * w.groups + g0;
    for (int64_t g = 0; g < groups; ++g) {
      xd[k * groups + g] = values[k] * scale_of(s[g]);
      zero[k * groups + g] = static_cast<Z>(z[g]);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define ACTSPARSE_VECTOR 1
// R rows (a compile-time count, so the row loop unrolls) into `groups` groups.
// Each group of a row has a table of its 16 values q - z as float32 (exact),
// and vpermps looks the nibbles up in it: it reads the low 4 bits of each
// index, so the low nibble needs no mask, and the lookup replaces both the
// zero-point subtraction and the int-to-float conversion.
template <int R>
inline void add_group_rows_avx512(
    float* __restrict__ acc, const uint8_t* const* r, const float* xd, const float* zero,
    int64_t groups) {
  const __m512 levels =
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < groups; ++g) {
    float* a = acc + g * kGroupSize;
    __m512 a0 = _mm512_loadu_ps(a);
    __m512 a1 = _mm512_loadu_ps(a + 16);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) {
      const __m512i bytes = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[k] + g * (kGroupSize / 2))));
      const __m512 table = _mm512_sub_ps(levels, _mm512_set1_ps(zero[k * groups + g]));
      const __m512 v = _mm512_set1_ps(xd[k * groups + g]);
      a0 = _mm512_fmadd_ps(v, _mm512_permutexvar_ps(bytes, table), a0);
      a1 = _mm512_fmadd_ps(v, _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), a1);
    }
    _mm512_storeu_ps(a, a0);
    _mm512_storeu_ps(a + 16, a1);
  }
}

void add_rows_vector(
    float* __restrict__ acc, const Int4Weights& w, int64_t c0, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
  const int64_t g0 = c0 / kGroupSize;
  const int64_t groups = width / kGroupSize;
  std::vector<float> xd(static_cast<size_t>(kRows * groups));
  std::vector<float> zero(static_cast<size_t>(kRows * groups));
  int64_t k = 0;
  while (k < n) {
    const int rows_now = static_cast<int>(std::min<int64_t>(kRows, n - k));
    const uint8_t* r[kRows];
    prepare_rows(w, g0, groups, rows + k, values + k, rows_now, r, xd.data(), zero.data());
    if (rows_now == kRows) {
      add_group_rows_avx512<kRows>(acc, r, xd.data(), zero.data(), groups);
    } else {
      for (int g8 = 0; g8 < rows_now; ++g8) {
        add_group_rows_avx512<1>(acc, r + g8, xd.data() + g8 * groups, zero.data() + g8 * groups, groups);
      }
    }
    k += rows_now;
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define ACTSPARSE_VECTOR 1
void add_rows_vector(
    float* __restrict__ acc, const Int4Weights& w, int64_t c0, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
  const int64_t g0 = c0 / kGroupSize;
  const int64_t groups = width / kGroupSize;
  const __m256i low = _mm256_set1_epi32(0x0F);
  std::vector<float> xd(static_cast<size_t>(kRows * groups));
  std::vector<int32_t> zero(static_cast<size_t>(kRows * groups));
  int64_t k = 0;
  while (k < n) {
    const int rows_now = static_cast<int>(std::min<int64_t>(kRows, n - k));
    const uint8_t* r[kRows];
    prepare_rows(w, g0, groups, rows + k, values + k, rows_now, r, xd.data(), zero.data());
    for (int64_t g = 0; g < groups; ++g) {
      float* a = acc + g * kGroupSize;
      __m256 a0 = _mm256_loadu_ps(a);
      __m256 a1 = _mm256_loadu_ps(a + 8);
      __m256 a2 = _mm256_loadu_ps(a + 16);
      __m256 a3 = _mm256_loadu_ps(a + 24);
      for (int g8 = 0; g8 < rows_now; ++g8) {
        const uint8_t* bytes = r[g8] + g * (kGroupSize / 2);
        const __m256i b0 =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
        const __m256i b1 =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
        const __m256i z = _mm256_set1_epi32(zero[g8 * groups + g]);
        const __m256 v = _mm256_set1_ps(xd[g8 * groups + g]);
        a0 = _mm256_fmadd_ps(
            v, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b0, low), z)), a0);
        a1 = _mm256_fmadd_ps(
            v, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b1, low), z)), a1);
        a2 = _mm256_fmadd_ps(
            v, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b0, 4), z)), a2);
        a3 = _mm256_fmadd_ps(
            v, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b1, 4), z)), a3);
      }
      _mm256_storeu_ps(a, a0);
      _mm256_storeu_ps(a + 8, a1);
      _mm256_storeu_ps(a + 16, a2);
      _mm256_storeu_ps(a + 24, a3);
    }
    k += rows_now;
  }
}
#endif

void add_rows(
    int64_t path, float* acc, const Int4Weights& w, int64_t c0, const int64_t* rows,
    const float* values, int64_t n, int64_t width) {
#ifdef ACTSPARSE_VECTOR
  if (path == q::kVectorPath) {
    add_rows_vector(acc, w, c0, rows, values, n, width);
    return;
  }
#endif
  add_rows_scalar(acc, w, c0, rows, values, n, width);
}

Int4Weights weights_of(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros) {
  TORCH_CHECK(
      qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
          qweight.is_contiguous() && qweight.size(1) % (kGroupSize / 2) == 0,
      "int4_linear_cpu: qweight must be a contiguous uint8 (in, out_pad / 2) CPU tensor, "
      "out_pad a multiple of 32");
  const int64_t in = qweight.size(0);
  const int64_t groups = qweight.size(1) / (kGroupSize / 2);
  TORCH_CHECK(
      scales.device().is_cpu() && scales.scalar_type() == at::kBFloat16 && scales.dim() == 2 &&
          scales.size(0) == in && scales.size(1) == groups && scales.is_contiguous(),
      "int4_linear_cpu: scales must be a contiguous bfloat16 (in, out_pad / 32) CPU tensor");
  TORCH_CHECK(
      zeros.device().is_cpu() && zeros.scalar_type() == at::kByte && zeros.dim() == 2 &&
          zeros.size(0) == in && zeros.size(1) == groups && zeros.is_contiguous(),
      "int4_linear_cpu: zeros must be a contiguous uint8 (in, out_pad / 32) CPU tensor");
  return Int4Weights{
      qweight.const_data_ptr<uint8_t>(),
      reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>()),
      zeros.const_data_ptr<uint8_t>(), groups * kGroupSize, groups};
}

at::Tensor sparse_columns(
    const at::Tensor& x2, const Int4Weights& w, int64_t out, const std::optional<at::Tensor>& bias,
    double threshold, int64_t path) {
  const int64_t tokens = x2.size(0);
  const int64_t in = x2.size(1);
  at::Tensor y = at::empty({tokens, out}, x2.options());
  const q::KeptEntries kept = q::kept_entries(x2.const_data_ptr<float>(), tokens, in, threshold);
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* y_data = y.mutable_data_ptr<float>();
  const int64_t block = tokens == 1 ? kBlockOneToken : kBlockTokens;
  q::parallel_columns(w.out_pad, kept.offsets[tokens] * w.out_pad, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> acc(static_cast<size_t>(std::min(block, c_end - c_begin)));
    for (int64_t c0 = c_begin; c0 < c_end; c0 += block) {
      const int64_t width = std::min(block, c_end - c0);
      const int64_t kept_width = std::max<int64_t>(0, std::min(width, out - c0));
      for (int64_t t = 0; t < tokens; ++t) {
        std::fill(acc.begin(), acc.begin() + width, 0.0f);
        const int64_t lo = kept.offsets[t];
        add_rows(
            path, acc.data(), w, c0, kept.rows.data() + lo, kept.values.data() + lo,
            kept.offsets[t + 1] - lo, width);
        float* y_row = y_data + t * out + c0;
        for (int64_t c = 0; c < kept_width; ++c) {
          y_row[c] = b == nullptr ? acc[c] : acc[c] + b[c0 + c];
        }
      }
    }
  });
  return y;
}

// columns [c0, c1) of the float32 weight, into target (in, c1 - c0), any row
// stride; c0 is a multiple of 32
void dequantize_into(at::Tensor& target, const Int4Weights& w, int64_t in, int64_t c0, int64_t c1) {
  float* dst = target.mutable_data_ptr<float>();
  const int64_t stride = target.stride(0);
  const int64_t width = c1 - c0;
  at::parallel_for(0, in, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)),
                   [&](int64_t i0, int64_t i1) {
                     float values[kGroupSize];
                     for (int64_t i = i0; i < i1; ++i) {
                       const uint8_t* row = w.packed + i * (w.out_pad / 2);
                       float* d = dst + i * stride;
                       for (int64_t g = c0 / kGroupSize; g * kGroupSize < c1; ++g) {
                         const float scale = scale_of(w.scales[i * w.groups + g]);
                         const int32_t z = w.zeros[i * w.groups + g];
                         const uint8_t* bytes = row + g * (kGroupSize / 2);
                         for (int64_t k = 0; k < kGroupSize / 2; ++k) {
                           values[k] = static_cast<float>((bytes[k] & 0x0F) - z) * scale;
                           values[k + kGroupSize / 2] = static_cast<float>((bytes[k] >> 4) - z) * scale;
                         }
                         const int64_t first = g * kGroupSize;
                         const int64_t count = std::min(kGroupSize, c1 - first);
                         std::memcpy(d + (first - c0), values, count * sizeof(float));
                       }
                     }
                   });
}

// x (*, in) float32; qweight, scales, zeros as above; bias (out,) float32 or
// None; out the layer's output features (<= out_pad). path: see
// quantized_kernel.h (0 picks).
at::Tensor int4_linear_cpu(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
    const at::Tensor& zeros, const std::optional<at::Tensor>& bias, double threshold,
    int64_t out, int64_t path) {
  const Int4Weights w = weights_of(qweight, scales, zeros);
  TORCH_CHECK(path >= 0 && path <= 3, "int4_linear_cpu: path must be 0, 1, 2 or 3");
  TORCH_CHECK(
      0 <= out && out <= w.out_pad && w.out_pad - out < kGroupSize,
      "int4_linear_cpu: out must be out_pad less fewer than 32 columns");
  const int64_t in = qweight.size(0);
  const at::Tensor x2 = q::tokens_of(x, in, "int4_linear_cpu");
  const std::optional<at::Tensor> b = q::bias_of(bias, out, "int4_linear_cpu");
  const std::vector<int64_t> shape = q::out_shape(x, out);
  if (x2.size(0) == 0 || out == 0) {
    return at::empty(shape, x.options());
  }
  const int64_t run_path = q::chosen_path(x2, threshold, path);
  if (run_path == q::kMatmulPath) {
    const at::Tensor shrunk = at::hardshrink(x2, threshold);
    return q::dequantized_matmul(shrunk, out, b, [&](at::Tensor& slab, int64_t c0, int64_t c1) {
             dequantize_into(slab, w, in, c0, c1);
           })
        .view(shape);
  }
  return sparse_columns(x2, w, out, b, threshold, run_path).view(shape);
}

at::Tensor int4_dequantize_cpu(
    const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
    int64_t col_begin, int64_t col_end) {
  const Int4Weights w = weights_of(qweight, scales, zeros);
  TORCH_CHECK(
      0 <= col_begin && col_begin <= col_end && col_end <= w.out_pad &&
          col_begin % kGroupSize == 0,
      "int4_dequantize_cpu: columns out of range (col_begin a multiple of 32)");
  at::Tensor target = at::empty(
      {qweight.size(0), col_end - col_begin}, qweight.options().dtype(at::kFloat));
  dequantize_into(target, w, qweight.size(0), col_begin, col_end);
  return target;
}

// Quantizes a float32 weight, input-major (in, out), into (qweight, scales,
// zeros) as above. For each group, the step sizes range / s for s in 15, 14,
// 13 and 12 (range = max(hi, 0) - min(lo, 0), rounded to bfloat16) are
// tried, each with its zero point round(-lo / step); the one with the
// smallest squared error wins. A weight that is already on such a grid finds
// its own grid again, so quantizing the dequantized weight gives it back.
std::vector<at::Tensor> int4_quantize_cpu(const at::Tensor& weight_t_any) {
  TORCH_CHECK(
      weight_t_any.device().is_cpu() && weight_t_any.scalar_type() == at::kFloat &&
          weight_t_any.dim() == 2,
      "int4_quantize_cpu: weight_t must be a float32 (in, out) CPU tensor");
  const at::Tensor weight_t = weight_t_any.contiguous();
  const int64_t in = weight_t.size(0);
  const int64_t out = weight_t.size(1);
  const int64_t groups = (out + kGroupSize - 1) / kGroupSize;
  at::Tensor qweight = at::empty({in, groups * kGroupSize / 2}, weight_t.options().dtype(at::kByte));
  at::Tensor scales = at::empty({in, groups}, weight_t.options().dtype(at::kBFloat16));
  at::Tensor zeros = at::empty({in, groups}, weight_t.options().dtype(at::kByte));
  const float* src = weight_t.const_data_ptr<float>();
  uint8_t* packed = qweight.mutable_data_ptr<uint8_t>();
  at::BFloat16* scale_out = scales.mutable_data_ptr<at::BFloat16>();
  uint8_t* zero_out = zeros.mutable_data_ptr<uint8_t>();
  constexpr int kSteps[] = {15, 14, 13, 12};
  at::parallel_for(0, in * groups, 256, [&](int64_t begin, int64_t end) {
    float values[kGroupSize];
    uint8_t best_q[kGroupSize];
    uint8_t trial_q[kGroupSize];
    for (int64_t index = begin; index < end; ++index) {
      const int64_t i = index / groups;
      const int64_t g = index % groups;
      float lo = 0.0f;
      float hi = 0.0f;
      for (int64_t j = 0; j < kGroupSize; ++j) {
        const int64_t c = g * kGroupSize + j;
        values[j] = c < out ? src[i * out + c] : 0.0f;
        lo = std::min(lo, values[j]);
        hi = std::max(hi, values[j]);
      }
      float best_error = INFINITY;
      at::BFloat16 best_scale(0.0f);
      uint8_t best_zero = 0;
      for (const int steps : kSteps) {
        const at::BFloat16 scale_bf16((hi - lo) / static_cast<float>(steps));
        const float scale = static_cast<float>(scale_bf16);
        const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
        const float zero = std::min(15.0f, std::max(0.0f, std::nearbyint(-lo * inverse)));
        float error = 0.0f;
        for (int64_t j = 0; j < kGroupSize; ++j) {
          const float level =
              std::min(15.0f, std::max(0.0f, std::nearbyint(values[j] * inverse + zero)));
          trial_q[j] = static_cast<uint8_t>(level);
          const float diff = (level - zero) * scale - values[j];
          error += diff * diff;
        }
        if (error < best_error) {
          best_error = error;
          best_scale = scale_bf16;
          best_zero = static_cast<uint8_t>(zero);
          std::memcpy(best_q, trial_q, sizeof(best_q));
        }
      }
      uint8_t* bytes = packed + i * (groups * kGroupSize / 2) + g * (kGroupSize / 2);
      for (int64_t k = 0; k < kGroupSize / 2; ++k) {
        bytes[k] = static_cast<uint8_t>(best_q[k] | (best_q[k + kGroupSize / 2] << 4));
      }
      scale_out[index] = best_scale;
      zero_out[index] = best_zero;
    }
  });
  return {qweight, scales, zeros};
}

std::string int4_isa() { return q::compiled_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(actsparse_kernels, m) {
  m.def(
      "int4_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, "
      "float threshold, int out, int path=0) -> Tensor");
  m.def(
      "int4_dequantize_cpu(Tensor qweight, Tensor scales, Tensor zeros, int col_begin, "
      "int col_end) -> Tensor");
  m.def("int4_quantize_cpu(Tensor weight_t) -> Tensor[]");
  m.def("int4_isa() -> str", &int4_isa);
}

TORCH_LIBRARY_IMPL(actsparse_kernels, CPU, m) {
  m.impl("int4_linear_cpu", &int4_linear_cpu);
  m.impl("int4_dequantize_cpu", &int4_dequantize_cpu);
  m.impl("int4_quantize_cpu", &int4_quantize_cpu);
}
