// CPU implementation of loratools::all_finite: one single-threaded pass over the exponent bits.
// torch.aminmax (the fallback) parallelises small tensors too, and on a busy two-core machine
// every OpenMP region then waits for a core: checking an adapter's ~100 small factors took 0.1-0.2 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace loratools {
namespace {

// True when no element has an all-ones exponent (Inf or NaN): |x| as an integer (sign bit cleared)
// stays below `limit`. A running max is branch-free and vectorises; blocks of 4096 words still stop
// early on a bad block. Built for AVX2 too, chosen at load time (target_clones).
#if defined(__x86_64__) && defined(__GNUC__)
#define LT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LT_CLONES
#endif

template <typename S>
inline bool below(const S* p, int64_t n, S mask, S limit) {
  constexpr int64_t kBlock = 4096;
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t end = std::min(n, i + kBlock);
    S hi = 0;
    for (int64_t j = i; j < end; ++j) hi = std::max<S>(hi, p[j] & mask);
    if (hi >= limit) return false;
  }
  return true;
}

LT_CLONES bool finite32(const int32_t* p, int64_t n) { return below<int32_t>(p, n, 0x7FFFFFFF, 0x7F800000); }
LT_CLONES bool finite16(const int16_t* p, int64_t n, int16_t limit) { return below<int16_t>(p, n, 0x7FFF, limit); }

bool all_finite_cpu(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel();
  switch (c.scalar_type()) {
    case at::kFloat:
      return finite32(static_cast<const int32_t*>(c.const_data_ptr()), n);
    case at::kBFloat16:
      return finite16(static_cast<const int16_t*>(c.const_data_ptr()), n, 0x7F80);
    case at::kHalf:
      return finite16(static_cast<const int16_t*>(c.const_data_ptr()), n, 0x7C00);
    default:
      TORCH_CHECK(false, "all_finite: dtype ", c.scalar_type(), " is not fp32/bf16/fp16");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(loratools, CPU, m) { m.impl("all_finite", &all_finite_cpu); }

}  // namespace loratools
