"""Build dbc_fast: the Python package, the Triton kernels (kernels/ -> dbc_fast.kernels) and the op library.

The op library ``dbc_fast/_C*.so`` holds the C++ ops of csrc/*.cpp (CPU, always) and, when a CUDA
toolkit whose major.minor matches torch's CUDA is found, the CUDA kernels of csrc/cuda/*.cu. It has no
Python bindings (py_limited_api, no libtorch_python), so C++ programs can load it with libtorch alone;
Python loads it with torch.ops.load_library (dbc_fast.ops.library_path()).

Environment: DBC_FAST_NO_CUDA=1 skips the CUDA kernels; DBC_FAST_NO_EXT=1 skips the op library;
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0").
"""
import glob
import os
import re
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[dbc_fast setup] {msg}", flush=True)


def _cuda_toolkit():
    """Returns CUDA_HOME if a toolkit matching torch's CUDA version is usable, else None (and says why)."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("DBC_FAST_NO_CUDA") == "1":
        _say("DBC_FAST_NO_CUDA=1: building without CUDA kernels")
        return None
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: building without CUDA kernels")
        return None
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        _say(f"no CUDA toolkit found (CUDA_HOME={home}): building without CUDA kernels. "
             f"Install nvcc {torch.version.cuda} (see install.sh) to build them.")
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    if not found or found.group(1) != torch.version.cuda:
        _say(f"nvcc at {nvcc} is CUDA {found.group(1) if found else '?'}, torch wants {torch.version.cuda}: "
             "building without CUDA kernels")
        return None
    return home


def _extensions():
    if os.environ.get("DBC_FAST_NO_EXT") == "1":
        _say("DBC_FAST_NO_EXT=1: no op library")
        return [], {}
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    cxx_flags = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    common = dict(name="dbc_fast._C", include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_link_args=["-fopenmp"], py_limited_api=True)
    cuda_home = _cuda_toolkit() if cu_sources else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _say(f"building CUDA kernels with {cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = cpp_extension.CUDAExtension(
            sources=cpp_sources + cu_sources,
            define_macros=[("DBC_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            **common)
    else:
        ext = cpp_extension.CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dbc_fast",
    version="0.1.0",
    description="Dual-branch contrastive WSOL (DBC) on Conformer, with fused Triton/CUDA kernels",
    packages=find_packages(include=["dbc_fast", "dbc_fast.*"]) + ["dbc_fast.kernels"],
    package_dir={"dbc_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "timm", "numpy", "pillow", "pyyaml", "tqdm",
                      "opencv-python-headless"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["dbc-fast=dbc_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
