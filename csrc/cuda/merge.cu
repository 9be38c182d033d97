// CUDA kernel for loratools::merge_: W += sum_i c_i B_i A_i in one pass over W.
//
// Several adapters are concatenated once per call into fp32 buffers on the device, Bc [rows, R]
// (c_i folded in) and Ac [R, cols]; they are small next to W. One adapter whose factors share a
// dtype and do not overlap W is read in place instead (converted and scaled as it is staged, the
// same fp32 values): no buffers, one launch, which matters when W itself moves in microseconds.
// Each thread block owns a 64 x 128 tile of W: it stages 16-deep slices of B and A in shared
// memory, accumulates the rank-R product in registers (4 rows x 8 columns per thread), and only
// then reads its W values, adds, rounds once (RNE) and writes them back, with 128-bit accesses
// where aligned.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs cuBLAS headers
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../merge_common.h"

namespace loratools {
namespace {

constexpr int kBM = 64, kBN = 128, kBK = 16;  // W tile and rank slice per block
constexpr int kTM = 4, kTN = 8;                // per-thread sub-tile
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float v) { return v; }
};
template <> struct Cvt<__nv_bfloat16> {
  __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Cvt<__half> {
  __device__ static float to_f(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
};

// Adds acc to kTN consecutive elements of one W row. 8 bf16/fp16 = one 128-bit access, 8 fp32 =
// two; otherwise (ragged edge or unaligned view) element by element.
template <typename T>
__device__ __forceinline__ void add_row(T* w, int valid, const float (&acc)[kTN]) {
  constexpr int kVecBytes = 16;
  constexpr int kPerVec = kVecBytes / sizeof(T);
  static_assert(kTN % kPerVec == 0, "tile width must be whole vectors");
  if (valid == kTN && reinterpret_cast<uintptr_t>(w) % kVecBytes == 0) {
#pragma unroll
    for (int v = 0; v < kTN / kPerVec; ++v) {
      uint4 raw = reinterpret_cast<const uint4*>(w)[v];
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerVec; ++j) e[j] = Cvt<T>::from_f(Cvt<T>::to_f(e[j]) + acc[v * kPerVec + j]);
      reinterpret_cast<uint4*>(w)[v] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kTN; ++j)  // constant indices keep acc in registers
      if (j < valid) w[j] = Cvt<T>::from_f(Cvt<T>::to_f(w[j]) + acc[j]);
  }
}

// Where the kernel reads B [rows, R] and A [R, cols] from, as fp32 with the coefficient folded in.
struct Packed {  // the concatenated fp32 buffers (any number of adapters)
  const float* __restrict__ bc;
  const float* __restrict__ ac;
  int64_t R, cols;
  __device__ float b(int64_t r, int64_t k) const { return bc[r * R + k]; }
  __device__ float a(int64_t k, int64_t c) const { return ac[k * cols + c]; }
};
template <typename F>
struct Direct {  // one adapter's own tensors, through their strides
  const F* __restrict__ up;
  const F* __restrict__ down;
  int64_t su0, su1, sd0, sd1;
  float coeff;
  __device__ float b(int64_t r, int64_t k) const { return coeff * Cvt<F>::to_f(up[r * su0 + k * su1]); }
  __device__ float a(int64_t k, int64_t c) const { return Cvt<F>::to_f(down[k * sd0 + c * sd1]); }
};

template <typename T, typename Factors>
__global__ void __launch_bounds__(kThreads)
merge_kernel(T* __restrict__ w, int64_t ldw, int64_t rows, int64_t cols, Factors f, int64_t R) {
  __shared__ float bs[kBK][kBM + 4];  // transposed: a thread's kTM rows are contiguous; +4 spreads banks
  __shared__ float as[kBK][kBN];
  const int tid = threadIdx.x;
  const int tx = tid % (kBN / kTN), ty = tid / (kBN / kTN);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;  // x: up to 2^31 - 1 row tiles
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN;

  float acc[kTM][kTN] = {};
  for (int64_t k0 = 0; k0 < R; k0 += kBK) {
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int k = e % kBK, m = e / kBK;  // consecutive threads walk one Bc row
      const int64_t gr = row0 + m, gk = k0 + k;
      bs[k][m] = (gr < rows && gk < R) ? f.b(gr, gk) : 0.f;
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int k = e / kBN, n = e % kBN;  // consecutive threads walk one Ac row
      const int64_t gk = k0 + k, gc = col0 + n;
      as[k][n] = (gk < R && gc < cols) ? f.a(gk, gc) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float b[kTM], a[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) b[i] = bs[k][ty * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) a[j] = as[k][tx * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(b[i], a[j], acc[i][j]);
    }
    __syncthreads();
  }

  const int64_t c = col0 + tx * kTN;
  if (c >= cols) return;
  const int valid = static_cast<int>(cols - c < kTN ? cols - c : kTN);
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t r = row0 + ty * kTM + i;
    if (r < rows) add_row<T>(w + r * ldw + c, valid, acc[i]);
  }
}

template <typename Factors>
void launch(at::Tensor& w, const Factors& f, int64_t R) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t ldw = rows > 1 ? w.stride(0) : cols;
  const int64_t row_tiles = (rows + kBM - 1) / kBM, col_tiles = (cols + kBN - 1) / kBN;
  TORCH_CHECK(row_tiles < (int64_t{1} << 31) && col_tiles <= 65535, "merge_: weight ", w.sizes(),
              " is too large for one launch");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // == at::cuda::getCurrentCUDAStream
  switch (w.scalar_type()) {
    case at::kFloat:
      merge_kernel<float><<<grid, kThreads, 0, stream>>>(w.data_ptr<float>(), ldw, rows, cols, f, R);
      break;
    case at::kBFloat16:
      merge_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<__nv_bfloat16*>(w.data_ptr<at::BFloat16>()), ldw, rows, cols, f, R);
      break;
    case at::kHalf:
      merge_kernel<__half><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<__half*>(w.data_ptr<at::Half>()), ldw, rows, cols, f, R);
      break;
    default:
      TORCH_CHECK(false, "merge_: unsupported weight dtype ", w.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F, typename S>
Direct<F> direct(const at::Tensor& u, const at::Tensor& d, double coeff) {
  return Direct<F>{reinterpret_cast<const F*>(u.data_ptr<S>()), reinterpret_cast<const F*>(d.data_ptr<S>()),
                   u.stride(0), u.stride(1), d.stride(0), d.stride(1), static_cast<float>(coeff)};
}

// `w` has contiguous rows (see merge_any_layout).
void merge_rows_cuda(at::Tensor& w, at::TensorList ups, at::TensorList downs, at::ArrayRef<double> coeffs) {
  const int64_t rows = w.size(0), cols = w.size(1);
  int64_t R = 0;
  for (const auto& u : ups) R += u.size(1);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(w.device());
  // One adapter, read where it lies: only when its factors cannot change while W is written.
  if (ups.size() == 1 && ups[0].scalar_type() == downs[0].scalar_type() &&
      at::get_overlap_status(w, ups[0]) == at::MemOverlapStatus::No &&
      at::get_overlap_status(w, downs[0]) == at::MemOverlapStatus::No) {
    switch (ups[0].scalar_type()) {
      case at::kFloat: return launch(w, direct<float, float>(ups[0], downs[0], coeffs[0]), R);
      case at::kBFloat16: return launch(w, direct<__nv_bfloat16, at::BFloat16>(ups[0], downs[0], coeffs[0]), R);
      case at::kHalf: return launch(w, direct<__half, at::Half>(ups[0], downs[0], coeffs[0]), R);
      default: break;  // checked before: not reached
    }
  }
  // fp32 copies of all factors, made before W is written (so factors aliasing W are safe).
  auto opts = w.options().dtype(at::kFloat);
  at::Tensor bc = at::empty({rows, R}, opts);
  at::Tensor ac = at::empty({R, cols}, opts);
  int64_t off = 0;
  for (size_t i = 0; i < ups.size(); ++i) {
    const int64_t r = ups[i].size(1);
    bc.narrow(1, off, r).copy_(ups[i]).mul_(static_cast<float>(coeffs[i]));
    ac.narrow(0, off, r).copy_(downs[i]);
    off += r;
  }
  launch(w, Packed{bc.data_ptr<float>(), ac.data_ptr<float>(), R, cols}, R);
}

void merge_cuda(at::Tensor& weight, at::TensorList ups, at::TensorList downs, at::ArrayRef<double> coeffs) {
  merge_any_layout(weight, ups, downs, coeffs, merge_rows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(loratools, CUDA, m) { m.impl("merge_", &merge_cuda); }

}  // namespace loratools
