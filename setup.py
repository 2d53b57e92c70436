"""Builds the native extension `engine._C`.

CPU kernels always; CUDA kernels (csrc/cuda/*.cu) as well when torch was built with CUDA and nvcc
is found. `ENGINE_NO_EXT=1` skips the native build (engine.ops then falls back to engine.reference).
No -march=native and no -ffast-math: the wheel must run on other CPUs and keep NaN/inf semantics.
"""
import glob
import os

from setuptools import setup


def _extension_kwargs() -> dict:
    """Extension modules and build command for setup(); empty when the native build is skipped."""
    if os.environ.get("ENGINE_NO_EXT") == "1":
        return {}
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp", "csrc/checks.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "engine._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "engine._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_extension_kwargs())
