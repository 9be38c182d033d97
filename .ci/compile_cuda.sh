#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed): nvcc -c every csrc/cuda/*.cu with the
# flags torch.utils.cpp_extension would use, into a throwaway directory. Fails on any error.
# Usage: .ci/compile_cuda.sh   (NVCC=/path/to/nvcc and PYTHON=python3 may be overridden)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || { echo "compile_cuda: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 1; }

mapfile -t INCLUDES < <("$PYTHON" - <<'PY'
import sysconfig
from torch.utils import cpp_extension
for p in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]:
    print("-I" + p)
PY
)
ABI=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
# Same defines as cpp_extension's CUDA build; torch >= 2.10 headers need C++20.
FLAGS=(-std=c++20 -O3 "-D_GLIBCXX_USE_CXX11_ABI=$ABI" -DTORCH_API_INCLUDE_EXTENSION_H
       -DTORCH_EXTENSION_NAME=_C -DLORATOOLS_WITH_CUDA --expt-relaxed-constexpr
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Xcompiler -fPIC -Werror all-warnings
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# CPU-only torch wheels ship the c10/cuda headers but not this CMake-generated one; recreate it
# (a CUDA build of torch defines exactly this) so the compile check works against either wheel.
if ! "$PYTHON" -c 'import os, sys; from torch.utils import cpp_extension as c; sys.exit(not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in c.include_paths()))'; then
  mkdir -p "$OUT/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDES+=("-I$OUT/shim")
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
[ ${#SOURCES[@]} -gt 0 ] || { echo "compile_cuda: no csrc/cuda/*.cu" >&2; exit 1; }
for src in "${SOURCES[@]}"; do
  echo "nvcc -c $src"
  "$NVCC" "${FLAGS[@]}" "${INCLUDES[@]}" -c "$src" -o "$OUT/$(basename "$src").o"
done
echo "compile_cuda: ${#SOURCES[@]} file(s) OK with $("$NVCC" --version | tail -1)"
