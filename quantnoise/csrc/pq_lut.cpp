// quantnoise.runtime's compiled look-up-table kernel (pq Linear, few tokens): the gather-sum half of
// Jegou et al. 2011's asymmetric distance computation / AQLM's LUT GEMM.  The table itself,
// table[t, j, c] = <x[t, j*bs:(j+1)*bs], C[c]>, is one GEMM done by PyTorch (quantnoise/runtime_kernels.py);
// here  y[t, o] = sum_j table[t, j, codes[o, j]]  in fp32, rows o split over torch's intra-op threads.
// Registered as torch.ops.quantnoise.pq_lut_gather; the pure PyTorch path is kept and tested equal.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

constexpr int64_t kMaxTokens = 16;

// y (T, out) = sum_j table (T, m, k)[:, j, codes (out, m)[o, j]] for rows [begin, end); T known at compile time
template <int T, typename code_t>
void rows_sum(const float* table, const code_t* codes, float* y, int64_t out, int64_t m, int64_t k,
              int64_t begin, int64_t end) {
  const int64_t mk = m * k;
  for (int64_t o = begin; o < end; ++o) {
    const code_t* c = codes + o * m;
    float a[T] = {0.f}, b[T] = {0.f};  // two independent chains: the loads overlap
    int64_t j = 0;
    for (; j + 2 <= m; j += 2) {
      const float* e0 = table + (j + 0) * k + c[j + 0];
      const float* e1 = table + (j + 1) * k + c[j + 1];
      for (int t = 0; t < T; ++t) a[t] += e0[t * mk];
      for (int t = 0; t < T; ++t) b[t] += e1[t * mk];
    }
    if (j < m) {
      const float* e0 = table + j * k + c[j];
      for (int t = 0; t < T; ++t) a[t] += e0[t * mk];
    }
    for (int t = 0; t < T; ++t) y[t * out + o] = a[t] + b[t];
  }
}

template <typename code_t>
void rows_sum_any(const float* table, const code_t* codes, float* y, int64_t out, int64_t m, int64_t k, int64_t T,
                  int64_t begin, int64_t end) {
  const int64_t mk = m * k;
  for (int64_t o = begin; o < end; ++o) {
    const code_t* c = codes + o * m;
    float acc[kMaxTokens] = {0.f};
    for (int64_t j = 0; j < m; ++j) {
      const float* e = table + j * k + c[j];
      for (int64_t t = 0; t < T; ++t) acc[t] += e[t * mk];
    }
    for (int64_t t = 0; t < T; ++t) y[t * out + o] = acc[t];
  }
}

template <typename code_t>
void gather_sum(const float* table, const code_t* codes, float* y, int64_t out, int64_t m, int64_t k, int64_t T) {
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    switch (T) {
      case 1: rows_sum<1>(table, codes, y, out, m, k, begin, end); break;
      case 2: rows_sum<2>(table, codes, y, out, m, k, begin, end); break;
      case 4: rows_sum<4>(table, codes, y, out, m, k, begin, end); break;
      case 8: rows_sum<8>(table, codes, y, out, m, k, begin, end); break;
      default: rows_sum_any(table, codes, y, out, m, k, T, begin, end);
    }
  });
}

at::Tensor pq_lut_gather(const at::Tensor& table, const at::Tensor& codes) {
  TORCH_CHECK(table.dim() == 3 && table.scalar_type() == at::kFloat && table.is_contiguous() && table.is_cpu(),
              "pq_lut_gather: table must be a contiguous CPU float32 (T, m, k) tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.is_cpu() && codes.size(1) == table.size(1),
              "pq_lut_gather: codes must be a contiguous CPU (out, m) tensor matching the table");
  const int64_t out = codes.size(0), m = codes.size(1), k = table.size(2), T = table.size(0);
  TORCH_CHECK(T >= 1 && T <= kMaxTokens, "pq_lut_gather: 1 to ", kMaxTokens, " tokens, got ", T);
  at::Tensor y = at::empty({T, out}, table.options());
  // codes are trusted to lie in [0, k): quantnoise.export.check_map verified them when the file was read
  switch (codes.scalar_type()) {
    case at::kByte: gather_sum(table.data_ptr<float>(), codes.data_ptr<uint8_t>(), y.data_ptr<float>(), out, m, k, T); break;
    case at::kShort: gather_sum(table.data_ptr<float>(), codes.data_ptr<int16_t>(), y.data_ptr<float>(), out, m, k, T); break;
    default: TORCH_CHECK(false, "pq_lut_gather: codes must be uint8 or int16, got ", codes.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(quantnoise, m) { m.def("pq_lut_gather(Tensor table, Tensor codes) -> Tensor"); }
TORCH_LIBRARY_IMPL(quantnoise, CPU, m) { m.impl("pq_lut_gather", &pq_lut_gather); }
