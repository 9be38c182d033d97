"""Builds the optional loratools._C extension (CPU always, CUDA when available).

LORATOOLS_NO_EXTENSION=1  skip the extension (loratools falls back to plain torch)
LORATOOLS_FORCE_CUDA=1    build the CUDA kernels even if torch reports no CUDA
"""
import glob
import os

from setuptools import setup


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def extensions():
    if _truthy("LORATOOLS_NO_EXTENSION"):
        return [], {}
    from torch.utils import cpp_extension as ce

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    use_cuda = _truthy("LORATOOLS_FORCE_CUDA") or (
        _torch_has_cuda() and ce.CUDA_HOME is not None
    )
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers need C++20
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = ce.CUDAExtension(
            "loratools._C", sources,
            extra_compile_args={"cxx": cxx + ["-DLORATOOLS_WITH_CUDA"],
                                "nvcc": ["-O3", "-DLORATOOLS_WITH_CUDA", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"]
        )
    else:
        ext = ce.CppExtension("loratools._C", sources, extra_compile_args=cxx,
                              extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=False)}


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
