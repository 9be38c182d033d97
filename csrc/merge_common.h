// Shared by the CPU and CUDA implementations of loratools::merge_:
// argument checks and reduction of any weight layout to "rows are contiguous".
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <vector>

namespace loratools {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_merge_args(const at::Tensor& weight, at::TensorList ups, at::TensorList downs,
                             at::ArrayRef<double> coeffs) {
  TORCH_CHECK(weight.dim() == 2, "merge_: weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(is_float_dtype(weight.scalar_type()), "merge_: weight dtype ", weight.scalar_type(),
              " is not fp32/bf16/fp16");
  TORCH_CHECK(ups.size() == downs.size() && ups.size() == coeffs.size(),
              "merge_: ups, downs and coeffs must have the same length");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  for (size_t i = 0; i < ups.size(); ++i) {
    const at::Tensor& u = ups[i];
    const at::Tensor& d = downs[i];
    TORCH_CHECK(u.dim() == 2 && d.dim() == 2 && u.size(0) == rows && d.size(1) == cols &&
                    u.size(1) == d.size(0),
                "merge_: factors ", u.sizes(), " @ ", d.sizes(), " do not fit weight ", weight.sizes());
    TORCH_CHECK(is_float_dtype(u.scalar_type()) && is_float_dtype(d.scalar_type()),
                "merge_: factors must be fp32/bf16/fp16");
    TORCH_CHECK(u.device() == weight.device() && d.device() == weight.device(),
                "merge_: factors must be on the weight's device");
  }
}

// Calls kernel(w, ups, downs, coeffs) with a weight view whose columns have stride 1 (so a row is
// contiguous and rows are `w.stride(0)` apart). A column-major weight (e.g. `W.t()`) is merged as
// W^T += sum c_i A_i^T B_i^T, which costs nothing; any other layout goes through a contiguous copy.
// Factors are read through their strides, so they are only transposed as views.
template <class Kernel>
void merge_any_layout(at::Tensor& weight, at::TensorList ups, at::TensorList downs,
                      at::ArrayRef<double> coeffs, Kernel&& kernel) {
  check_merge_args(weight, ups, downs, coeffs);
  const int64_t rows = weight.size(0), cols = weight.size(1);
  if (ups.empty() || rows == 0 || cols == 0) return;
  at::assert_no_internal_overlap(weight);  // e.g. an expand()ed weight: in place is ill-defined

  if (cols == 1 || weight.stride(1) == 1) {
    kernel(weight, ups, downs, coeffs);
  } else if (rows == 1 || weight.stride(0) == 1) {
    std::vector<at::Tensor> ups_t, downs_t;
    for (size_t i = 0; i < ups.size(); ++i) {
      ups_t.push_back(downs[i].t());
      downs_t.push_back(ups[i].t());
    }
    at::Tensor wt = weight.t();
    kernel(wt, ups_t, downs_t, coeffs);
  } else {
    at::Tensor tmp = weight.contiguous();
    kernel(tmp, ups, downs, coeffs);
    weight.copy_(tmp);
  }
}

}  // namespace loratools
