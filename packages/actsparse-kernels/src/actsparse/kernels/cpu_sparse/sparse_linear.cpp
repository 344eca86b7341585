// Zero-skipping y = hardshrink(x, t) @ Wt + b on the CPU.
//
// Wt is the weight in input-major layout, shape (in, out), contiguous: the
// contribution of input i to every output is the contiguous row Wt[i, :].
// An input entry is kept iff !(|x_i| <= t), so NaN and inf are kept and
// propagate as in the dense product; every other entry is skipped, and with
// it its weight row. At one token the product is bound by memory bandwidth,
// so reading only the kept rows is where the speed comes from.
//
// The kept entries of each token are listed once (input index and value),
// then the output columns are split into one chunk per thread
// (at::parallel_for). Two schedules, both accumulating in fp32:
//
// * Streaming (few tokens). For each token, its kept rows are added into the
//   chunk's accumulator eight at a time: one pass over the accumulator reads
//   eight weight rows side by side, so the memory system sees eight long
//   sequential streams and the accumulator is loaded and stored once per
//   eight rows. Long contiguous reads are what memory bandwidth wants; each
//   token reads its own kept rows.
//
// * Register tiles (more tokens). A block of columns is cut into slabs of
//   input rows small enough to stay in L2; for each token, one tile of output
//   columns lives in registers while the token's kept rows of the slab are
//   added in. The slab is read from memory once and then from L2 for the
//   other tokens, and no accumulator goes through memory inside the loop, so
//   the work stays close to the arithmetic the kept entries need.
//
// The loops are plain C++ (GCC vector extensions for the register tiles) and
// are vectorised by the compiler for the CPU the extension is built on. bf16
// weights are widened to fp32 as they are loaded; the bias is added in fp32
// and the result rounded once to the output dtype.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// Below this many multiply-adds the product runs on one thread.
constexpr int64_t kMinParallelWork = 1 << 16;

// Streaming: weight rows added per pass over the accumulator.
constexpr int kGroup = 8;

// Register tiles: kTileVectors vectors of 16 floats, enough independent
// accumulators to cover the latency of the fused multiply-add: 8 with the 32
// vector registers of AVX-512, 4 otherwise (with AVX2 each is a pair of
// 8-float registers: 8 of the 16 registers hold accumulators).
using vfloat = float __attribute__((vector_size(64)));
using vbf16 = uint16_t __attribute__((vector_size(32)));
using vbits = uint32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
#if defined(__AVX512F__)
constexpr int kTileVectors = 8;
#else
constexpr int kTileVectors = 4;
#endif
constexpr int64_t kTile = kTileVectors * kLanes;
// Columns per block (one accumulator row per token), and bytes of weights
// per slab: half of a 1 MiB L2.
constexpr int64_t kTileBlock = 256;
constexpr int64_t kSlabBytes = 512 * 1024;
static_assert(kTileBlock % kTile == 0, "a block is whole tiles");
// Parallel chunks of output columns start on multiples of this.
constexpr int64_t kColumnUnit = kTile;

// Register tiles from this many tokens on, streaming below (schedule 0):
// where tiles overtook streaming on Llama-7B MLP shapes in float32.
constexpr int64_t kTileMinTokens = 8;

inline float widen(float v) { return v; }

inline float widen(uint16_t bf16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline vfloat load_lanes(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vfloat load_lanes(const uint16_t* p) {
  vbf16 h;
  std::memcpy(&h, p, sizeof(h));
  // A cast between vector types of one size keeps the bits.
  return (vfloat)(__builtin_convertvector(h, vbits) << 16);
}

inline void store_lanes(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline void store(float* __restrict__ out, const float* __restrict__ acc, int64_t n) {
  std::memcpy(out, acc, n * sizeof(float));
}

inline void store(c10::BFloat16* __restrict__ out, const float* __restrict__ acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    out[c] = c10::BFloat16(acc[c]);
  }
}

// acc[0, n) += v * w[0, n)
template <typename W>
inline void scaled_add(float* __restrict__ acc, const W* __restrict__ w, float v, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += v * widen(w[c]);
  }
}

// Adds the kept entries (rows[k], values[k]) of one token into kTile columns,
// acc[0, kTile): w points at the first of those columns in row 0 of Wt.
template <typename W>
inline void tile_accumulate(
    float* acc, const W* w, int64_t out, const int64_t* rows, const float* values, int64_t n) {
  vfloat a[kTileVectors];
#pragma GCC unroll 8
  for (int j = 0; j < kTileVectors; ++j) {
    a[j] = load_lanes(acc + j * kLanes);
  }
  for (int64_t k = 0; k < n; ++k) {
    const W* row = w + rows[k] * out;
    const float v = values[k];
#pragma GCC unroll 8
    for (int j = 0; j < kTileVectors; ++j) {
      a[j] += v * load_lanes(row + j * kLanes);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kTileVectors; ++j) {
    store_lanes(acc + j * kLanes, a[j]);
  }
}

// As tile_accumulate, for the last width < kTile columns.
template <typename W>
inline void tail_accumulate(
    float* acc, const W* w, int64_t out, const int64_t* rows, const float* values, int64_t n,
    int64_t width) {
  for (int64_t k = 0; k < n; ++k) {
    scaled_add(acc, w + rows[k] * out, values[k], width);
  }
}

// acc[0, width) += sum over k of values[k] * w[rows[k] * out + (0, width)],
// kGroup rows per pass over acc.
template <typename W>
inline void add_rows(
    float* __restrict__ acc, const W* w, int64_t out, const int64_t* rows, const float* values,
    int64_t n, int64_t width) {
  int64_t k = 0;
  for (; k + kGroup <= n; k += kGroup) {
    const W* __restrict__ r[kGroup];
    float v[kGroup];
#pragma GCC unroll 8
    for (int g = 0; g < kGroup; ++g) {
      r[g] = w + rows[k + g] * out;
      v[g] = values[k + g];
    }
    for (int64_t c = 0; c < width; ++c) {
      float sum = acc[c];
#pragma GCC unroll 8
      for (int g = 0; g < kGroup; ++g) {
        sum += v[g] * widen(r[g][c]);
      }
      acc[c] = sum;
    }
  }
  for (; k < n; ++k) {
    scaled_add(acc, w + rows[k] * out, values[k], width);
  }
}

// The kept entries of x (tokens x in), token by token: the entries of token t
// are [offsets[t], offsets[t + 1]), input indices ascending.
struct KeptEntries {
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;   // the input index
  std::vector<float> values;   // the entry, widened to fp32
};

template <typename X>
struct Keep {
  float limit;
  // As hardshrink does, compare against the threshold rounded to x's dtype.
  explicit Keep(double threshold)
      : limit(static_cast<float>(static_cast<X>(static_cast<float>(threshold)))) {}
  // A negation, so that NaN (every comparison false) is kept.
  bool operator()(X value) const { return !(std::abs(static_cast<float>(value)) <= limit); }
};

template <typename X>
KeptEntries kept_entries(const X* x, int64_t tokens, int64_t in, Keep<X> keep) {
  KeptEntries kept;
  kept.offsets.reserve(tokens + 1);
  kept.offsets.push_back(0);
  for (int64_t t = 0; t < tokens; ++t) {
    const X* row = x + t * in;
    for (int64_t i = 0; i < in; ++i) {
      if (keep(row[i])) {
        kept.rows.push_back(i);
        kept.values.push_back(static_cast<float>(row[i]));
      }
    }
    kept.offsets.push_back(static_cast<int64_t>(kept.rows.size()));
  }
  return kept;
}

template <typename Y>
void finish_block(
    float* acc, int64_t stride, const float* bias, Y* y, int64_t tokens, int64_t out, int64_t b0,
    int64_t width) {
  for (int64_t t = 0; t < tokens; ++t) {
    float* a = acc + t * stride;
    if (bias != nullptr) {
      for (int64_t c = 0; c < width; ++c) {
        a[c] += bias[b0 + c];
      }
    }
    store(y + t * out + b0, a, width);
  }
}

// Streaming schedule, output columns [col_begin, col_end) of every token.
template <typename W, typename Y>
void stream_columns(
    const KeptEntries& kept, const W* weight, const float* bias, Y* y, int64_t tokens, int64_t out,
    int64_t col_begin, int64_t col_end) {
  const int64_t width = col_end - col_begin;
  std::vector<float> acc(static_cast<size_t>(tokens * width), 0.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t lo = kept.offsets[t];
    add_rows(
        acc.data() + t * width, weight + col_begin, out, kept.rows.data() + lo,
        kept.values.data() + lo, kept.offsets[t + 1] - lo, width);
  }
  finish_block(acc.data(), width, bias, y, tokens, out, col_begin, width);
}

// Register-tile schedule, output columns [col_begin, col_end) of every token.
// slab_starts[t * (slabs + 1) + s] is the first entry of token t in slab s.
template <typename W, typename Y>
void tile_columns(
    const KeptEntries& kept, const std::vector<int64_t>& slab_starts, int64_t slabs,
    const W* weight, const float* bias, Y* y, int64_t tokens, int64_t out, int64_t col_begin,
    int64_t col_end) {
  std::vector<float> acc(static_cast<size_t>(tokens * kTileBlock));
  const int64_t* rows = kept.rows.data();
  const float* values = kept.values.data();
  for (int64_t b0 = col_begin; b0 < col_end; b0 += kTileBlock) {
    const int64_t width = std::min(kTileBlock, col_end - b0);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t s = 0; s < slabs; ++s) {
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t lo = slab_starts[t * (slabs + 1) + s];
        const int64_t n = slab_starts[t * (slabs + 1) + s + 1] - lo;
        if (n == 0) {
          continue;
        }
        float* a = acc.data() + t * kTileBlock;
        int64_t c = 0;
        for (; c + kTile <= width; c += kTile) {
          tile_accumulate(a + c, weight + b0 + c, out, rows + lo, values + lo, n);
        }
        if (c < width) {
          tail_accumulate(a + c, weight + b0 + c, out, rows + lo, values + lo, n, width - c);
        }
      }
    }
    finish_block(acc.data(), kTileBlock, bias, y, tokens, out, b0, width);
  }
}

template <typename X, typename W>
void run(
    const at::Tensor& x, const at::Tensor& weight_t, const float* bias, double threshold,
    int64_t schedule, at::Tensor& y) {
  const int64_t tokens = x.size(0);
  const int64_t in = x.size(1);
  const int64_t out = weight_t.size(1);
  const W* weight = reinterpret_cast<const W*>(weight_t.const_data_ptr());
  X* y_data = y.mutable_data_ptr<X>();
  const KeptEntries kept = kept_entries(x.const_data_ptr<X>(), tokens, in, Keep<X>(threshold));
  const int64_t units = (out + kColumnUnit - 1) / kColumnUnit;
  const int64_t work_per_unit = std::max<int64_t>(1, kept.offsets[tokens] * kColumnUnit);
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / work_per_unit);
  const bool tiles = schedule == 0 ? tokens >= kTileMinTokens : schedule == 2;
  if (!tiles) {
    at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
      stream_columns(
          kept, weight, bias, y_data, tokens, out, u0 * kColumnUnit,
          std::min(u1 * kColumnUnit, out));
    });
    return;
  }
  const int64_t slab_rows =
      std::max<int64_t>(1, kSlabBytes / (kTileBlock * static_cast<int64_t>(sizeof(W))));
  const int64_t slabs = std::max<int64_t>(1, (in + slab_rows - 1) / slab_rows);
  std::vector<int64_t> slab_starts(static_cast<size_t>(tokens * (slabs + 1)));
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t k = kept.offsets[t];
    for (int64_t s = 0; s < slabs; ++s) {
      slab_starts[t * (slabs + 1) + s] = k;
      while (k < kept.offsets[t + 1] && kept.rows[k] < (s + 1) * slab_rows) {
        ++k;
      }
    }
    slab_starts[t * (slabs + 1) + slabs] = kept.offsets[t + 1];
  }
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    tile_columns(
        kept, slab_starts, slabs, weight, bias, y_data, tokens, out, u0 * kColumnUnit,
        std::min(u1 * kColumnUnit, out));
  });
}

// x (*, in) and weight_t (in, out), of one dtype (float32 or bfloat16),
// any strides (copied to contiguous if needed); bias (out,) of that dtype or
// None. schedule: 0 picks by the number of tokens, 1 forces streaming, 2
// forces register tiles.
at::Tensor sparse_linear_cpu(
    const at::Tensor& x_any, const at::Tensor& weight_any, const std::optional<at::Tensor>& bias,
    double threshold, int64_t schedule) {
  TORCH_CHECK(
      x_any.device().is_cpu() && weight_any.device().is_cpu(),
      "sparse_linear_cpu: CPU tensors only");
  TORCH_CHECK(x_any.dim() >= 1, "sparse_linear_cpu: x needs a feature dimension");
  TORCH_CHECK(weight_any.dim() == 2, "sparse_linear_cpu: weight_t must be 2-D (in, out)");
  const int64_t in = weight_any.size(0);
  const int64_t out = weight_any.size(1);
  TORCH_CHECK(
      x_any.size(-1) == in, "sparse_linear_cpu: x has ", x_any.size(-1),
      " features, weight_t has ", in, " rows");
  TORCH_CHECK(
      x_any.scalar_type() == weight_any.scalar_type(),
      "sparse_linear_cpu: x and weight_t dtypes differ");
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "sparse_linear_cpu: schedule must be 0, 1 or 2");
  const auto dtype = x_any.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kBFloat16,
      "sparse_linear_cpu: float32 or bfloat16 only, got ", dtype);
  std::vector<int64_t> out_shape(x_any.sizes().begin(), x_any.sizes().end());
  out_shape.back() = out;
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < x_any.dim(); ++d) {
    tokens *= x_any.size(d);
  }
  const at::Tensor x = x_any.reshape({tokens, in}).contiguous();
  const at::Tensor weight_t = weight_any.contiguous();
  at::Tensor y = at::empty({tokens, out}, x.options());
  std::vector<float> bias_fp32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(
        bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out &&
            bias->scalar_type() == dtype,
        "sparse_linear_cpu: bias must be an (out,) tensor of x's dtype");
    const at::Tensor b = bias->contiguous();
    bias_fp32.resize(out);
    if (dtype == at::kFloat) {
      std::memcpy(bias_fp32.data(), b.const_data_ptr<float>(), out * sizeof(float));
    } else {
      const c10::BFloat16* values = b.const_data_ptr<c10::BFloat16>();
      for (int64_t c = 0; c < out; ++c) {
        bias_fp32[c] = static_cast<float>(values[c]);
      }
    }
  }
  if (y.numel() > 0) {
    const float* bias_ptr = bias_fp32.empty() ? nullptr : bias_fp32.data();
    if (dtype == at::kFloat) {
      run<float, float>(x, weight_t, bias_ptr, threshold, schedule, y);
    } else {
      run<c10::BFloat16, uint16_t>(x, weight_t, bias_ptr, threshold, schedule, y);
    }
  }
  return y.view(out_shape);
}

// The number of threads at::parallel_for gives a large loop: the width the
// kernel runs at under the current torch.get_num_threads().
int64_t parallel_width() {
  std::atomic<int64_t> widest{0};
  at::parallel_for(0, int64_t{1} << 16, 1, [&](int64_t, int64_t) {
    const int64_t width = static_cast<int64_t>(at::get_thread_num()) + 1;
    int64_t seen = widest.load();
    while (seen < width && !widest.compare_exchange_weak(seen, width)) {
    }
  });
  return widest.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(actsparse_kernels, m) {
  m.def(
      "sparse_linear_cpu(Tensor x, Tensor weight_t, Tensor? bias, float threshold, "
      "int schedule=0) -> Tensor");
  m.def("parallel_width() -> int", &parallel_width);
}

TORCH_LIBRARY_IMPL(actsparse_kernels, CPU, m) {
  m.impl("sparse_linear_cpu", &sparse_linear_cpu);
}
