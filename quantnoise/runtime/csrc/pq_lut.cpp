// quantnoise.runtime's compiled kernels for pq Linear (CPU, fp32), the pure PyTorch versions being in
// quantnoise/runtime_kernels.py (kept, and tested equal to these):
//  - pq_lut_linear (few tokens): Jegou et al. 2011's asymmetric distance computation / AQLM's LUT GEMM.  The table
//    table[c, j, t] = <x[t, j*bs:(j+1)*bs], C[c]> is made tile by tile (block positions j0..j1, one GEMM each, ~256 KB:
//    cache-resident, a small workspace whatever the layer), and each tile summed into all rows before the next:
//    y[t, o] += sum_j table[codes[o, j], j, t]; each code selects T contiguous floats (one vector load for T <= 16),
//    so the sums of all tokens run together; tiles shared out over torch's intra-op threads, each summing into
//    its own partial result; then the bias.  Up to 16 tokens per call (one call: per-call overhead matters in
//    batch-1 generation).
//  - pq_direct_linear (few tokens, no table): y[t, o] = sum_j <C[codes[o, j]], x[t, j*bs:(j+1)*bs]> + bias[o], the weight
//    decoded into registers as it is used (the int4 kernel's way): each code selects its centroid (bs floats; the
//    codebook, k x bs, stays in L1 / L2), two (bs = 8) or four (bs = 4) centroids make one vector register, multiplied
//    with the input's matching features for a tile of rows x tokens (accumulators in registers, summed across the
//    vector once per row and token at the end); x read in place (any row stride); output rows shared out over torch's
//    intra-op threads.  Work: fp32's multiply-adds exactly (no k x in/bs table per token), memory: the codes.
//    AVX-512 or AVX2 + FMA where compiled for it (-march=native), a portable loop otherwise; bs 4, 8, 16
//    vectorised, any other block size on the portable loop.
//  - pq_decode (many tokens): W[o, j*bs:(j+1)*bs] = C[codes[o, j]], straight from the uint8 / int16 codes (no int64
//    index copy), for a GEMM by PyTorch.
//  - int4_linear (few tokens): y[t, o] = scale[o] * sum_i (u[o, i] - qmax) * x[t, i] + bias[o] straight from the
//    packed nibbles (quantnoise.export's layout: value 2j in the low nibble of byte j, 2j+1 in the high one), each
//    nibble widened to fp32 in registers and multiplied in fp32 (so equal to the decoded layer within fp32
//    rounding: no activation quantization); the input split once per call into its even and odd features so a
//    byte's two nibbles meet contiguous inputs; output rows shared out over torch's intra-op threads.  AVX-512 or
//    AVX2 + FMA where compiled for it (-march=native), a portable loop otherwise.
// Registered as torch.ops.quantnoise.{pq_lut_linear,pq_direct_linear,pq_decode,int4_linear}.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxTokens = 16;
constexpr int64_t kTileBytes = 256 << 10;  // table slice walked by all rows before moving on (fits L2)
constexpr int64_t kInt4BlockBytes = 32 << 10;  // packed int4 rows walked by all tokens before the next block

// yt (out, T) += sum_{j in [j0, j1)} tile[codes[o, j] * cs + (j - jbase) * T + t] for rows [begin, end): a table
// (or a tile of it holding block positions jbase...) with its T entries of (c, j) contiguous; T at compile time
template <int T, typename code_t>
void rows_sum(const float* tile, int64_t cs, int64_t jbase, const code_t* codes, float* yt, int64_t m, int64_t j0,
              int64_t j1, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const code_t* c = codes + o * m;
    float a[T], b[T];  // two independent chains: the loads overlap (four spill registers at T = 16: 2x slower)
    for (int t = 0; t < T; ++t) a[t] = yt[o * T + t], b[t] = 0.f;
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      const float* e0 = tile + static_cast<int64_t>(c[j]) * cs + (j - jbase) * T;
      const float* e1 = tile + static_cast<int64_t>(c[j + 1]) * cs + (j + 1 - jbase) * T;
      for (int t = 0; t < T; ++t) a[t] += e0[t];
      for (int t = 0; t < T; ++t) b[t] += e1[t];
    }
    if (j < j1) {
      const float* e0 = tile + static_cast<int64_t>(c[j]) * cs + (j - jbase) * T;
      for (int t = 0; t < T; ++t) a[t] += e0[t];
    }
    for (int t = 0; t < T; ++t) yt[o * T + t] = a[t] + b[t];
  }
}

template <typename code_t>
void rows_sum_any(const float* tile, int64_t cs, int64_t jbase, const code_t* codes, float* yt, int64_t m, int64_t T,
                  int64_t j0, int64_t j1, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const code_t* c = codes + o * m;
    float* acc = yt + o * T;
    for (int64_t j = j0; j < j1; ++j) {
      const float* e = tile + static_cast<int64_t>(c[j]) * cs + (j - jbase) * T;
      for (int64_t t = 0; t < T; ++t) acc[t] += e[t];
    }
  }
}

// not inlined into its caller's lambda: inlined there, GCC 12 made the T = 16 loop 2x slower (measured)
template <typename code_t>
__attribute__((noinline)) void rows_sum_T(const float* tile, int64_t cs, int64_t jbase, const code_t* codes, float* yt, int64_t m, int64_t T,
                int64_t j0, int64_t j1, int64_t begin, int64_t end) {
  switch (T) {
    case 1: rows_sum<1>(tile, cs, jbase, codes, yt, m, j0, j1, begin, end); break;
    case 2: rows_sum<2>(tile, cs, jbase, codes, yt, m, j0, j1, begin, end); break;
    case 4: rows_sum<4>(tile, cs, jbase, codes, yt, m, j0, j1, begin, end); break;
    case 8: rows_sum<8>(tile, cs, jbase, codes, yt, m, j0, j1, begin, end); break;
    case 16: rows_sum<16>(tile, cs, jbase, codes, yt, m, j0, j1, begin, end); break;
    default: rows_sum_any(tile, cs, jbase, codes, yt, m, T, j0, j1, begin, end);
  }
}

int64_t tile_blocks(int64_t k, int64_t T) {  // block positions per table tile of ~kTileBytes
  return std::max<int64_t>(1, kTileBytes / (k * T * static_cast<int64_t>(sizeof(float))));
}

// y (T, out) = x (T, in) @ decode(codes, C).T [+ bias]: the table and its gather-sum in one call (few tokens)
at::Tensor pq_lut_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& centroids,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu(), "pq_lut_linear: x must be a CPU float32 (T, in) tensor");
  TORCH_CHECK(centroids.dim() == 2 && centroids.scalar_type() == at::kFloat && centroids.is_cpu(),
              "pq_lut_linear: centroids must be a CPU float32 (k, bs) tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu(), "pq_lut_linear: codes must be a contiguous CPU (out, m) tensor");
  TORCH_CHECK(codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort,
              "pq_lut_linear: codes must be uint8 or int16, got ", codes.scalar_type());
  const int64_t T = x.size(0), k = centroids.size(0), bs = centroids.size(1), out = codes.size(0), m = codes.size(1);
  TORCH_CHECK(x.size(1) == m * bs, "pq_lut_linear: x has ", x.size(1), " features, the codes ", m * bs);
  TORCH_CHECK(T >= 1 && T <= kMaxTokens, "pq_lut_linear: 1 to ", kMaxTokens, " tokens, got ", T);
  const at::Tensor xc = x.contiguous(), cc = centroids.contiguous();
  at::Tensor xt = at::empty({bs, m, T}, x.options());
  {
    const float* xp = xc.data_ptr<float>();
    float* tp = xt.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < m; ++j)
        for (int64_t b = 0; b < bs; ++b) tp[(b * m + j) * T + t] = xp[t * m * bs + j * bs + b];
  }
  // the table tile by tile (block positions j0..j1, one GEMM each; ~kTileBytes: stays in cache and keeps the
  // workspace small whatever the layer), each tile summed into every row before the next is made.  Threads share
  // out the tiles (at least one each), each summing into its own (out, T) partial, added up at the end: one
  // parallel region per call, no table made twice (a region per tile cost more in synchronisation than it
  // saved, and splitting rows instead makes every thread build every tile)
  const at::Tensor x2 = xt.view({bs, m * T});
  const int64_t threads = at::get_num_threads();
  int64_t tile = tile_blocks(k, T);
  if (threads > 1) tile = std::min(tile, (m + threads - 1) / threads);
  const int64_t tiles = (m + tile - 1) / tile;
  std::vector<at::Tensor> partial(threads);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor& acc = partial[at::get_thread_num()];
    if (!acc.defined()) acc = at::zeros({out, T}, x.options());
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j0 = i * tile, j1 = std::min(m, j0 + tile);
      const at::Tensor part = at::mm(cc, x2.narrow(1, j0 * T, (j1 - j0) * T));  // (k, (j1 - j0) * T)
      float* yp = acc.data_ptr<float>();
      if (codes.scalar_type() == at::kByte)
        rows_sum_T(part.data_ptr<float>(), (j1 - j0) * T, j0, codes.data_ptr<uint8_t>(), yp, m, T, j0, j1, 0, out);
      else
        rows_sum_T(part.data_ptr<float>(), (j1 - j0) * T, j0, codes.data_ptr<int16_t>(), yp, m, T, j0, j1, 0, out);
    }
  });
  at::Tensor yt;
  for (const at::Tensor& p : partial) {
    if (!p.defined()) continue;
    if (yt.defined()) yt.add_(p); else yt = p;
  }
  at::Tensor y = T == 1 ? yt.view({1, out}) : yt.t().contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out, "pq_lut_linear: bias of ", bias->numel(), " values for ", out, " outputs");
    y.add_(bias->to(at::kFloat).view({1, out}));
  }
  return y;
}

// ---------------------------------------------------------------------------------------- pq_direct_linear
#if defined(__AVX512F__)
#define QN_DIRECT_SIMD 1
using dvec = __m512;
constexpr int kVW = 16;  // floats per vector register
inline dvec dv_zero() { return _mm512_setzero_ps(); }
inline dvec dv_load(const float* p) { return _mm512_loadu_ps(p); }
inline dvec dv_fma(dvec a, dvec b, dvec c) { return _mm512_fmadd_ps(a, b, c); }
inline float dv_sum(dvec a) { return _mm512_reduce_add_ps(a); }
inline dvec dv_join(__m256 lo, __m256 hi) {  // AVX512F only (no DQ needed)
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
inline __m256 join128(const float* lo, const float* hi) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo)), _mm_loadu_ps(hi), 1);
}
// the kVW weights of features [i, i + kVW) of a row whose codes are c: its centroids side by side
template <int BS, typename code_t>
inline dvec dv_weights(const float* cents, const code_t* c, int64_t i) {
  if constexpr (BS == 16) {
    return dv_load(cents + static_cast<int64_t>(c[i / 16]) * 16);
  } else if constexpr (BS == 8) {
    const int64_t j = i / 8;
    return dv_join(_mm256_loadu_ps(cents + static_cast<int64_t>(c[j]) * 8),
                   _mm256_loadu_ps(cents + static_cast<int64_t>(c[j + 1]) * 8));
  } else {  // 4
    const int64_t j = i / 4;
    return dv_join(join128(cents + static_cast<int64_t>(c[j]) * 4, cents + static_cast<int64_t>(c[j + 1]) * 4),
                   join128(cents + static_cast<int64_t>(c[j + 2]) * 4, cents + static_cast<int64_t>(c[j + 3]) * 4));
  }
}
constexpr int kDirectAcc = 16;  // accumulator registers per tile (of 32)
#elif defined(__AVX2__) && defined(__FMA__)
#define QN_DIRECT_SIMD 1
using dvec = __m256;
constexpr int kVW = 8;
inline dvec dv_zero() { return _mm256_setzero_ps(); }
inline dvec dv_load(const float* p) { return _mm256_loadu_ps(p); }
inline dvec dv_fma(dvec a, dvec b, dvec c) { return _mm256_fmadd_ps(a, b, c); }
inline float dv_sum(dvec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
template <int BS, typename code_t>
inline dvec dv_weights(const float* cents, const code_t* c, int64_t i) {
  if constexpr (BS == 16) {
    return dv_load(cents + static_cast<int64_t>(c[i / 16]) * 16 + i % 16);
  } else if constexpr (BS == 8) {
    return dv_load(cents + static_cast<int64_t>(c[i / 8]) * 8);
  } else {  // 4
    const int64_t j = i / 4;
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(cents + static_cast<int64_t>(c[j]) * 4)),
                                _mm_loadu_ps(cents + static_cast<int64_t>(c[j + 1]) * 4), 1);
  }
}
constexpr int kDirectAcc = 8;  // of 16 registers
#endif

#ifdef QN_DIRECT_SIMD
// as dv_weights, the codes being bytes n0, n0 + 1, ... of a 64-bit word
template <int BS>
inline dvec dv_weights_word(const float* cents, uint64_t word, int n0) {
  uint8_t c[kVW / BS];
  for (int p = 0; p < kVW / BS; ++p) c[p] = static_cast<uint8_t>(word >> (8 * (n0 + p)));
  return dv_weights<BS>(cents, c, 0);
}
#endif

struct DirectArgs {
  const float* cents;
  const float* x;  // (T, in), row stride ldx
  int64_t ldx, m, out;
  const float* bias;  // nullptr: none
  float* y;  // (T, out)
};

#ifdef QN_DIRECT_SIMD
// rows [r, r + R) x tokens [t0, t0 + TB): R * TB accumulators, R weight registers, one input register
template <int BS, int R, int TB, typename code_t>
inline void direct_tile(const DirectArgs& a, const code_t* codes, int64_t r, int64_t t0) {
  const int64_t in = a.m * BS;
  const code_t* c[R];
  for (int q = 0; q < R; ++q) c[q] = codes + (r + q) * a.m;
  dvec acc[R][TB];
  for (int q = 0; q < R; ++q)
    for (int t = 0; t < TB; ++t) acc[q][t] = dv_zero();
  int64_t i = 0;
  if constexpr (sizeof(code_t) == 1 && BS <= kVW) {  // uint8 codes: 8 at a time in one 64-bit load, taken
    constexpr int kWord = 8 * BS;                         // apart in registers (fewer loads: the few-token bound)
    for (; i + kWord <= in; i += kWord) {
      uint64_t cw[R];
      for (int q = 0; q < R; ++q) std::memcpy(&cw[q], c[q] + i / BS, 8);
      for (int u = 0; u < kWord / kVW; ++u) {
        dvec w[R];
        for (int q = 0; q < R; ++q) w[q] = dv_weights_word<BS>(a.cents, cw[q], u * (kVW / BS));
        for (int t = 0; t < TB; ++t) {
          const dvec xv = dv_load(a.x + (t0 + t) * a.ldx + i + u * kVW);
          for (int q = 0; q < R; ++q) acc[q][t] = dv_fma(w[q], xv, acc[q][t]);
        }
      }
    }
  }
  for (; i + kVW <= in; i += kVW) {
    dvec w[R];
    for (int q = 0; q < R; ++q) w[q] = dv_weights<BS>(a.cents, c[q], i);
    for (int t = 0; t < TB; ++t) {
      const dvec xv = dv_load(a.x + (t0 + t) * a.ldx + i);
      for (int q = 0; q < R; ++q) acc[q][t] = dv_fma(w[q], xv, acc[q][t]);
    }
  }
  float s[R][TB];
  for (int q = 0; q < R; ++q)
    for (int t = 0; t < TB; ++t) s[q][t] = dv_sum(acc[q][t]);
  for (; i < in; i += BS) {  // in % kVW features left (BS divides in)
    for (int q = 0; q < R; ++q) {
      const float* e = a.cents + static_cast<int64_t>(c[q][i / BS]) * BS;
      for (int t = 0; t < TB; ++t) {
        const float* xp = a.x + (t0 + t) * a.ldx + i;
        for (int b = 0; b < BS; ++b) s[q][t] += e[b] * xp[b];
      }
    }
  }
  for (int q = 0; q < R; ++q)
    for (int t = 0; t < TB; ++t) a.y[(t0 + t) * a.out + r + q] = s[q][t] + (a.bias ? a.bias[r + q] : 0.f);
}

// tokens [t0, t0 + TB) for rows [r0, r1): R rows at a time, then one at a time
template <int BS, int R, int TB, typename code_t>
inline void direct_tokens(const DirectArgs& a, const code_t* codes, int64_t r0, int64_t r1, int64_t t0) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) direct_tile<BS, R, TB>(a, codes, r, t0);
  for (; r < r1; ++r) direct_tile<BS, 1, TB>(a, codes, r, t0);
}

constexpr int64_t kDirectRowBlock = 32;  // rows whose codes (L1) all token groups walk before the next block

template <int BS, typename code_t>
void direct_rows(const DirectArgs& a, const code_t* codes, int64_t T, int64_t begin, int64_t end) {
  constexpr int TB8 = kDirectAcc / 2, R8 = 2;  // AVX-512: 2 rows x 8 tokens; AVX2: 2 x 4
  for (int64_t r0 = begin; r0 < end; r0 += kDirectRowBlock) {
    const int64_t r1 = std::min(end, r0 + kDirectRowBlock);
    int64_t t = 0;
    for (; t + TB8 <= T; t += TB8) direct_tokens<BS, R8, TB8>(a, codes, r0, r1, t);
    if constexpr (TB8 > 4) {
      for (; t + 4 <= T; t += 4) direct_tokens<BS, kDirectAcc / 4, 4>(a, codes, r0, r1, t);
    }
    for (; t + 2 <= T; t += 2) direct_tokens<BS, 4, 2>(a, codes, r0, r1, t);
    for (; t < T; ++t) direct_tokens<BS, 4, 1>(a, codes, r0, r1, t);
  }
}
#endif

// the portable loop (any block size; the compiler may vectorise the inner products)
template <typename code_t>
void direct_rows_any(const DirectArgs& a, const code_t* codes, int64_t bs, int64_t T, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const code_t* c = codes + r * a.m;
    for (int64_t t = 0; t < T; ++t) {
      const float* xp = a.x + t * a.ldx;
      float s = 0.f;
      for (int64_t j = 0; j < a.m; ++j) {
        const float* e = a.cents + static_cast<int64_t>(c[j]) * bs;
        for (int64_t b = 0; b < bs; ++b) s += e[b] * xp[j * bs + b];
      }
      a.y[t * a.out + r] = s + (a.bias ? a.bias[r] : 0.f);
    }
  }
}

template <typename code_t>
void direct_dispatch(const DirectArgs& a, const code_t* codes, int64_t bs, int64_t T, int64_t begin, int64_t end) {
#ifdef QN_DIRECT_SIMD
  switch (bs) {
    case 4: return direct_rows<4>(a, codes, T, begin, end);
    case 8: return direct_rows<8>(a, codes, T, begin, end);
    case 16: return direct_rows<16>(a, codes, T, begin, end);
    default: break;
  }
#endif
  direct_rows_any(a, codes, bs, T, begin, end);
}

// y (T, out) = x (T, in) @ decode(codes, C).T [+ bias], the weight decoded into registers (no table, no copy)
at::Tensor pq_direct_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& centroids,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu(),
              "pq_direct_linear: x must be a CPU float32 (T, in) tensor");
  TORCH_CHECK(centroids.dim() == 2 && centroids.scalar_type() == at::kFloat && centroids.is_cpu(),
              "pq_direct_linear: centroids must be a CPU float32 (k, bs) tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu(),
              "pq_direct_linear: codes must be a contiguous CPU (out, m) tensor");
  TORCH_CHECK(codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort,
              "pq_direct_linear: codes must be uint8 or int16, got ", codes.scalar_type());
  const int64_t T = x.size(0), bs = centroids.size(1), out = codes.size(0), m = codes.size(1);
  TORCH_CHECK(x.size(1) == m * bs, "pq_direct_linear: x has ", x.size(1), " features, the codes ", m * bs);
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out, "pq_direct_linear: bias of ", bias->numel(), " values for ", out, " outputs");
    bc = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();  // rows read in place at their stride
  const at::Tensor cc = centroids.contiguous();
  at::Tensor y = at::empty({T, out}, x.options());
  if (T == 0 || out == 0) return y;
  const DirectArgs a{cc.data_ptr<float>(), xc.data_ptr<float>(), T > 1 ? xc.stride(0) : m * bs, m, out,
                     bc.defined() ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>()};
  // at least ~64 K multiply-adds per thread: a smaller share costs more in waking a thread than it saves
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(1, m * bs * T));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    if (codes.scalar_type() == at::kByte)
      direct_dispatch(a, codes.data_ptr<uint8_t>(), bs, T, begin, end);
    else
      direct_dispatch(a, codes.data_ptr<int16_t>(), bs, T, begin, end);
  });
  return y;
}

template <int BS, typename code_t>
void decode_block_rows(const float* cents, const code_t* codes, float* w, int64_t m, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const code_t* c = codes + o * m;
    float* row = w + o * m * BS;
    for (int64_t j = 0; j < m; ++j) {
      const float* e = cents + static_cast<int64_t>(c[j]) * BS;
      for (int b = 0; b < BS; ++b) row[j * BS + b] = e[b];  // BS known: a fixed-size vector copy
    }
  }
}

template <typename code_t>
void decode_rows(const float* cents, const code_t* codes, float* w, int64_t out, int64_t m, int64_t bs) {
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    switch (bs) {
      case 2: decode_block_rows<2>(cents, codes, w, m, begin, end); break;
      case 4: decode_block_rows<4>(cents, codes, w, m, begin, end); break;
      case 8: decode_block_rows<8>(cents, codes, w, m, begin, end); break;
      case 16: decode_block_rows<16>(cents, codes, w, m, begin, end); break;
      default:
        for (int64_t o = begin; o < end; ++o)
          for (int64_t j = 0; j < m; ++j)
            std::memcpy(w + (o * m + j) * bs, cents + static_cast<int64_t>(codes[o * m + j]) * bs, bs * sizeof(float));
    }
  });
}

at::Tensor pq_decode(const at::Tensor& codes, const at::Tensor& centroids) {
  TORCH_CHECK(centroids.dim() == 2 && centroids.scalar_type() == at::kFloat && centroids.is_contiguous() &&
                  centroids.is_cpu(), "pq_decode: centroids must be a contiguous CPU float32 (k, bs) tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu(),
              "pq_decode: codes must be a contiguous CPU (out, m) tensor");
  const int64_t out = codes.size(0), m = codes.size(1), bs = centroids.size(1);
  at::Tensor w = at::empty({out, m * bs}, centroids.options());
  switch (codes.scalar_type()) {
    case at::kByte: decode_rows(centroids.data_ptr<float>(), codes.data_ptr<uint8_t>(), w.data_ptr<float>(), out, m, bs); break;
    case at::kShort: decode_rows(centroids.data_ptr<float>(), codes.data_ptr<int16_t>(), w.data_ptr<float>(), out, m, bs); break;
    default: TORCH_CHECK(false, "pq_decode: codes must be uint8 or int16, got ", codes.scalar_type());
  }
  return w;
}

// y[t * out + o] for rows [begin, end) and tokens [t0, t0 + TB): xe / xo (T, half) the even / odd features
template <int TB>
void int4_rows(const uint8_t* w, const float* xe, const float* xo, int64_t half, int64_t out, int qmax,
               const float* scale, const float* bias, float* y, int64_t t0, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* p = w + o * half;
    float acc[TB];
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 ae[TB], ao[TB];
    for (int t = 0; t < TB; ++t) ae[t] = _mm512_setzero_ps(), ao[t] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32(15), off = _mm512_set1_epi32(qmax);
    for (; j + 16 <= half; j += 16) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, mask), off));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), off));
      for (int t = 0; t < TB; ++t) {
        ae[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xe + (t0 + t) * half + j), ae[t]);
        ao[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xo + (t0 + t) * half + j), ao[t]);
      }
    }
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_reduce_add_ps(_mm512_add_ps(ae[t], ao[t]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 ae[TB], ao[TB];  // 8 bytes (16 weights) a step; 2 x TB accumulators + 5 of the 16 registers
    for (int t = 0; t < TB; ++t) ae[t] = _mm256_setzero_ps(), ao[t] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(15), off = _mm256_set1_epi32(qmax);
    for (; j + 8 <= half; j += 8) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, mask), off));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), off));
      for (int t = 0; t < TB; ++t) {
        ae[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xe + (t0 + t) * half + j), ae[t]);
        ao[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xo + (t0 + t) * half + j), ao[t]);
      }
    }
    for (int t = 0; t < TB; ++t) acc[t] = dv_sum(_mm256_add_ps(ae[t], ao[t]));  // the no-table kernel's AVX2 sum
#else
    for (int t = 0; t < TB; ++t) acc[t] = 0.f;
#endif
    for (; j < half; ++j) {
      const float lo = static_cast<float>((p[j] & 15) - qmax), hi = static_cast<float>((p[j] >> 4) - qmax);
      for (int t = 0; t < TB; ++t) acc[t] += lo * xe[(t0 + t) * half + j] + hi * xo[(t0 + t) * half + j];
    }
    for (int t = 0; t < TB; ++t)
      y[(t0 + t) * out + o] = acc[t] * scale[o] + (bias ? bias[o] : 0.f);
  }
}

// y (T, out) = x (T, in) @ ((u - qmax) * scale).T [+ bias] for int-N weights held 4 bits wide (packed (out * in / 2)
// bytes, in even: every row starts on a byte), any number of tokens (meant for few: the weight is re-widened for
// every 4 tokens)
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t qmax,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu(), "int4_linear: x must be a CPU float32 (T, in) tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.is_cpu(),
              "int4_linear: the packed weight must be contiguous CPU uint8");
  const int64_t T = x.size(0), in = x.size(1), half = in / 2, out = scale.numel();
  TORCH_CHECK(in % 2 == 0 && packed.numel() == out * half, "int4_linear: ", packed.numel(), " bytes do not hold ", out,
              " rows of ", in, " 4-bit values (in must be even)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "int4_linear: scale must be contiguous float32");
  TORCH_CHECK(qmax >= 0 && qmax < 16, "int4_linear: qmax ", qmax, " is no 4-bit offset");
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out, "int4_linear: bias of ", bias->numel(), " values for ", out, " outputs");
    bc = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor xc = x.contiguous();
  std::vector<float> xs(2 * T * half);  // xe (T, half) then xo (T, half)
  const float* xp = xc.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < half; ++j) xs[t * half + j] = xp[t * in + 2 * j], xs[(T + t) * half + j] = xp[t * in + 2 * j + 1];
  at::Tensor y = at::empty({T, out}, x.options());
  const float *xe = xs.data(), *xo = xs.data() + T * half, *sp = scale.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int q = static_cast<int>(qmax);
  const int64_t rows = std::max<int64_t>(1, kInt4BlockBytes / std::max<int64_t>(1, half));  // widened once per 4 tokens
  at::parallel_for(0, out, std::max<int64_t>(16, rows), [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += rows) {  // a block of rows stays in L1 / L2 while the tokens walk it
      const int64_t r1 = std::min(end, r0 + rows);
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) int4_rows<4>(wp, xe, xo, half, out, q, sp, bp, yp, t, r0, r1);
      for (; t + 2 <= T; t += 2) int4_rows<2>(wp, xe, xo, half, out, q, sp, bp, yp, t, r0, r1);
      for (; t < T; ++t) int4_rows<1>(wp, xe, xo, half, out, q, sp, bp, yp, t, r0, r1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(quantnoise, m) {
  m.def("pq_decode(Tensor codes, Tensor centroids) -> Tensor");
  m.def("pq_lut_linear(Tensor x, Tensor codes, Tensor centroids, Tensor? bias) -> Tensor");
  m.def("pq_direct_linear(Tensor x, Tensor codes, Tensor centroids, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, int qmax, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(quantnoise, CPU, m) {
  m.impl("pq_decode", &pq_decode);
  m.impl("pq_lut_linear", &pq_lut_linear);
  m.impl("pq_direct_linear", &pq_direct_linear);
  m.impl("int4_linear", &int4_linear);
}
