// CPU kernel for loratools::merge_: W += sum_i c_i B_i A_i in one pass over W.
//
// All adapters are concatenated into one rank-R product, Bc [rows, R] (c_i folded in) times
// Ap (A in fp32, packed into 16-column panels [panel][R][16], zero-padded past `cols`), both built
// once per call. W is then walked in register tiles of MR rows x 16 columns: the tile is loaded
// (bf16/fp16 -> fp32), the rank-R update is accumulated on top of it in fp32 registers, and the
// result is rounded once (RNE) and stored. W is thus read and written exactly once, and no fp32
// copy of W exists. Tiles are grouped into (row block x column block) tasks so the A panels of a
// column block stay in L2 while rows stream past, and tasks are spread with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../merge_common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LORATOOLS_X86 1
#endif

namespace loratools {
namespace {

constexpr int64_t kNR = 16;  // columns per register tile / packed A panel
constexpr int kMR = 6;       // rows per register tile: 6x2 accumulators + 2 A + 1 B = 15 ymm
constexpr int64_t kRowBlock = 8 * kMR;
// Column (within a 16-wide panel) held by each slot of a tile row; see load16 for the bf16 order.
constexpr int kIdentityOrder[kNR] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
constexpr int kBf16Order[kNR] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
constexpr int64_t kPanelBudget = 128 * 1024;  // bytes of packed A per column block (L2-resident)

// ---- packing: factors of any dtype / strides -> fp32 ------------------------------------------

template <typename S>
void pack_b(const at::Tensor& u, float c, float* bc, int64_t R, int64_t off) {
  const S* src = u.data_ptr<S>();
  const int64_t rows = u.size(0), r = u.size(1), s0 = u.stride(0), s1 = u.stride(1);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(r, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t i = r0; i < r1; ++i)
                       for (int64_t k = 0; k < r; ++k)
                         bc[i * R + off + k] = c * static_cast<float>(src[i * s0 + k * s1]);
                   });
}

template <typename S>
void pack_a(const at::Tensor& d, float* ap, int64_t R, int64_t off, int64_t npanels, const int* slot_col) {
  const S* src = d.data_ptr<S>();
  const int64_t r = d.size(0), cols = d.size(1), s0 = d.stride(0), s1 = d.stride(1);
  at::parallel_for(0, npanels, std::max<int64_t>(1, 1024 / std::max<int64_t>(r, 1)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t p = p0; p < p1; ++p)
                       for (int64_t k = 0; k < r; ++k) {
                         float* dst = ap + (p * R + off + k) * kNR;
                         for (int64_t j = 0; j < kNR; ++j) {
                           const int64_t col = p * kNR + slot_col[j];
                           dst[j] = col < cols ? static_cast<float>(src[k * s0 + col * s1]) : 0.f;
                         }
                       }
                   });
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "merge_: unsupported dtype ", t);
  }
}

// ---- register tiles ----------------------------------------------------------------------------
// A strip is MR rows x (npanels * 16) columns of W, walked one 16-wide register tile at a time.
// w: the strip's first element, rows `ldw` apart. b: its MR rows of Bc (`ldb` apart).
// ap: its first packed A panel [R][16]; panels follow each other.

template <typename T, int MR>
void strip_portable(T* w, int64_t ldw, const float* b, int64_t ldb, const float* ap, int64_t R,
                    int64_t npanels) {
  for (int64_t pnl = 0; pnl < npanels; ++pnl, w += kNR, ap += R * kNR) {
    float acc[MR][kNR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] = static_cast<float>(w[i * ldw + j]);
    for (int64_t k = 0; k < R; ++k)
      for (int i = 0; i < MR; ++i) {
        const float bv = b[i * ldb + k];
        for (int j = 0; j < kNR; ++j) acc[i][j] += bv * ap[k * kNR + j];
      }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) w[i * ldw + j] = static_cast<T>(acc[i][j]);  // c10 casts are RNE
  }
}

#ifdef LORATOOLS_X86
#define LT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LT_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma,f16c")))

// A row of a tile is 16 columns held in two vectors (lo, hi). For bf16 the split is interleaved,
// lo = columns {0-3, 8-11}, hi = {4-7, 12-15}: that is what one unpack per vector produces from a
// 256-bit load, and one packus undoes it on store. The packed A panels use the same column order
// (see panel_order), so the permutation costs nothing.
LT_AVX2_INLINE void load16(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}
LT_AVX2_INLINE void load16(const c10::Half* p, __m256& lo, __m256& hi) {
  lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
LT_AVX2_INLINE void load16(const c10::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));  // bf16 bits become the high half
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}

LT_AVX2_INLINE void store16(float* p, __m256 lo, __m256 hi) {
  _mm256_storeu_ps(p, lo);
  _mm256_storeu_ps(p + 8, hi);
}
LT_AVX2_INLINE void store16(c10::Half* p, __m256 lo, __m256 hi) {
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, kRne));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, kRne));
}
// Same rounding as c10::BFloat16(float): add 0x7FFF + lsb and truncate; NaN -> quiet NaN 0x7FC0
// (adding the bias to a NaN could carry into the sign bit). Result is in the low 16 bits.
LT_AVX2_INLINE __m256i round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, lsb), _mm256_set1_epi32(0x7FFF)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
LT_AVX2_INLINE void store16(c10::BFloat16* p, __m256 lo, __m256 hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(round_bf16(lo), round_bf16(hi)));
}

template <typename T, int MR>
LT_AVX2 void strip_avx2(T* w, int64_t ldw, const float* b, int64_t ldb, const float* ap, int64_t R,
                        int64_t npanels) {
  for (int64_t pnl = 0; pnl < npanels; ++pnl, w += kNR, ap += R * kNR) {
    __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) load16(w + i * ldw, acc0[i], acc1[i]);
    for (int64_t k = 0; k < R; ++k) {
      const __m256 a0 = _mm256_loadu_ps(ap + k * kNR);
      const __m256 a1 = _mm256_loadu_ps(ap + k * kNR + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m256 bv = _mm256_broadcast_ss(b + i * ldb + k);
        acc0[i] = _mm256_fmadd_ps(bv, a0, acc0[i]);
        acc1[i] = _mm256_fmadd_ps(bv, a1, acc1[i]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) store16(w + i * ldw, acc0[i], acc1[i]);
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// LORATOOLS_CPU_KERNEL=portable forces the plain C++ tiles (tests use it to cover that path).
bool use_avx2() {
#ifdef LORATOOLS_X86
  const char* env = std::getenv("LORATOOLS_CPU_KERNEL");
  return cpu_has_avx2() && !(env && std::strcmp(env, "portable") == 0);
#else
  return false;
#endif
}

template <typename T, int MR>
void strip(bool avx2, T* w, int64_t ldw, const float* b, int64_t ldb, const float* ap, int64_t R,
           int64_t npanels) {
#ifdef LORATOOLS_X86
  if (avx2) return strip_avx2<T, MR>(w, ldw, b, ldb, ap, R, npanels);
#endif
  strip_portable<T, MR>(w, ldw, b, ldb, ap, R, npanels);
}

// The row count is a runtime value only at the bottom edge of a block; dispatch it to a template.
template <typename T>
void strip_rows(int mr, bool avx2, T* w, int64_t ldw, const float* b, int64_t ldb, const float* ap,
                int64_t R, int64_t npanels) {
  switch (mr) {
    case 6: return strip<T, 6>(avx2, w, ldw, b, ldb, ap, R, npanels);
    case 5: return strip<T, 5>(avx2, w, ldw, b, ldb, ap, R, npanels);
    case 4: return strip<T, 4>(avx2, w, ldw, b, ldb, ap, R, npanels);
    case 3: return strip<T, 3>(avx2, w, ldw, b, ldb, ap, R, npanels);
    case 2: return strip<T, 2>(avx2, w, ldw, b, ldb, ap, R, npanels);
    default: return strip<T, 1>(avx2, w, ldw, b, ldb, ap, R, npanels);
  }
}

// ---- driver ------------------------------------------------------------------------------------

struct Problem {
  int64_t rows, cols, ldw, R;
  const float* bc;  // [rows, R]
  const float* ap;  // [npanels, R, 16]
  bool avx2;
  const int* slot_col;  // column order of the panels and tiles
};

// Columns [c0, c1) of rows [r0, r1); c0 is a multiple of 16, c1 too unless it is `cols`.
template <typename T>
void merge_block(const Problem& p, T* w, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t full_end = std::max(c0, std::min(c1, p.cols / kNR * kNR));
  const int64_t nfull = (full_end - c0) / kNR;
  const float* ap = p.ap + (c0 / kNR) * p.R * kNR;
  for (int64_t r = r0; r < r1; r += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, r1 - r));
    const float* b = p.bc + r * p.R;
    T* wr = w + r * p.ldw;
    if (nfull > 0) strip_rows<T>(mr, p.avx2, wr + c0, p.ldw, b, p.R, ap, p.R, nfull);
    if (full_end == c1) continue;
    // Ragged right edge: run an fp32 tile on a zero-padded copy, round once on the way back.
    const int64_t n = c1 - full_end;
    float buf[kMR * kNR] = {};
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < kNR; ++j)
        if (p.slot_col[j] < n) buf[i * kNR + j] = static_cast<float>(wr[i * p.ldw + full_end + p.slot_col[j]]);
    strip_rows<float>(mr, p.avx2, buf, kNR, b, p.R, ap + nfull * p.R * kNR, p.R, 1);
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < kNR; ++j)
        if (p.slot_col[j] < n) wr[i * p.ldw + full_end + p.slot_col[j]] = static_cast<T>(buf[i * kNR + j]);
  }
}

template <typename T>
void merge_all(const Problem& p, T* w) {
  // Column block: as many 16-wide panels as fit the packed-A budget (at least one).
  const int64_t npanels = (p.cols + kNR - 1) / kNR;
  const int64_t nc_panels = std::clamp<int64_t>(kPanelBudget / (p.R * kNR * 4), 1, npanels);
  const int64_t nc = nc_panels * kNR;
  const int64_t nrb = (p.rows + kRowBlock - 1) / kRowBlock, ncb = (npanels + nc_panels - 1) / nc_panels;
  // Row-major task order: each thread streams through one contiguous range of W's rows; the A
  // column blocks it cycles through come from L2/L3 (A is R x cols, small next to W).
  const int64_t work_per_task = kRowBlock * nc * (p.R + 8);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / work_per_task);
  at::parallel_for(0, nrb * ncb, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t / ncb, cb = t % ncb;
      merge_block<T>(p, w, rb * kRowBlock, std::min(p.rows, (rb + 1) * kRowBlock), cb * nc,
                     std::min(p.cols, (cb + 1) * nc));
    }
  });
}

// `w` has contiguous rows (see merge_any_layout).
void merge_rows_cpu(at::Tensor& w, at::TensorList ups, at::TensorList downs, at::ArrayRef<double> coeffs) {
  const int64_t rows = w.size(0), cols = w.size(1);
  int64_t R = 0;
  for (const auto& u : ups) R += u.size(1);
  if (R == 0) return;
  const int64_t npanels = (cols + kNR - 1) / kNR;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor bc = at::empty({rows, R}, opts);
  at::Tensor ap = at::empty({npanels, R, kNR}, opts);
  const bool avx2 = use_avx2();
  const int* order = avx2 && w.scalar_type() == at::kBFloat16 ? kBf16Order : kIdentityOrder;
  // All factors are copied to fp32 before W is written, so factors aliasing W are safe.
  int64_t off = 0;
  for (size_t i = 0; i < ups.size(); ++i) {
    const float c = static_cast<float>(coeffs[i]);
    dispatch_float(ups[i].scalar_type(), [&](auto s) {
      pack_b<decltype(s)>(ups[i], c, bc.data_ptr<float>(), R, off);
    });
    dispatch_float(downs[i].scalar_type(), [&](auto s) {
      pack_a<decltype(s)>(downs[i], ap.data_ptr<float>(), R, off, npanels, order);
    });
    off += ups[i].size(1);
  }
  const Problem p{rows, cols, rows > 1 ? w.stride(0) : cols, R, bc.data_ptr<float>(),
                  ap.data_ptr<float>(), avx2, order};
  dispatch_float(w.scalar_type(), [&](auto s) { merge_all<decltype(s)>(p, w.data_ptr<decltype(s)>()); });
}

void merge_cpu(at::Tensor& weight, at::TensorList ups, at::TensorList downs, at::ArrayRef<double> coeffs) {
  merge_any_layout(weight, ups, downs, coeffs, merge_rows_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(loratools, CPU, m) { m.impl("merge_", &merge_cpu); }

}  // namespace loratools
