"""Build dbc_fast: the Python package, the Triton kernels (kernels/ -> dbc_fast.kernels) and the op library.

The op library ``dbc_fast/_C*.so`` holds the C++ ops of csrc/*.cpp (CPU, always) and, when a CUDA
toolkit whose major.minor matches torch's CUDA is found ($CUDA_HOME, the pip toolkit nvidia/cuNN that
install.sh fetches, or torch's default), the CUDA kernels of csrc/cuda/*.cu. If those fail to compile or
link, the library is built again with the CPU ops only and one "[dbc_fast setup]" line says so: a broken
CUDA toolkit never fails the install. It has no Python bindings (py_limited_api, no libtorch_python), so
C++ programs can load it with libtorch alone; Python loads it with torch.ops.load_library
(dbc_fast.ops.library_path()).

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


def _nvcc_release(home):
    """The "major.minor" of $home/bin/nvcc, or None where there is no working nvcc."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def _cuda_toolkit():
    """Returns the home of a CUDA toolkit matching torch's CUDA version, else None (and says why)."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("DBC_FAST_NO_CUDA") == "1":
        _say("DBC_FAST_NO_CUDA=1: building without CUDA kernels")
        return None
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: building without CUDA kernels")
        return None
    candidates = [os.environ.get("CUDA_HOME")]
    try:  # the pip toolkit (nvidia-cuda-nvcc and friends) lives in site-packages/nvidia/cuNN
        import nvidia

        candidates += [os.path.join(p, "cu" + torch.version.cuda.split(".")[0]) for p in nvidia.__path__]
    except ImportError:
        pass
    candidates.append(cpp_extension.CUDA_HOME)
    seen = []
    for home in dict.fromkeys(h for h in candidates if h):
        release = _nvcc_release(home)
        if release == torch.version.cuda:
            return home
        if release:
            seen.append(f"nvcc {release} in {home}")
    _say(f"no CUDA {torch.version.cuda} toolkit found ({'; '.join(seen) or 'no nvcc'}): building without CUDA "
         f"kernels. install.sh fetches nvcc {torch.version.cuda} from pip.")
    return None


def _cudart_link_dir(home):
    """pip's CUDA runtime wheel ships libcudart.so.N only; the link line (-lcudart) wants libcudart.so. Returns a
    folder under build/ holding that name, or None where the toolkit has it (or has no runtime at all)."""
    if any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib")):
        return None
    versioned = sorted(glob.glob(os.path.join(home, "lib*", "libcudart.so.[0-9]*")))
    if not versioned:
        return None
    link_dir = os.path.join(ROOT, "build", "cudart-link")
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(versioned[0], link)
    return link_dir


class _BuildOpLibrary:
    """Mixed into torch's BuildExtension (imported lazily): when the CUDA kernels fail to compile or link, builds
    the op library again from the CPU sources alone, with one line saying why."""

    def build_extensions(self):
        # BuildExtension swaps in its own compile functions; a second build must start from the originals.
        originals = self.compiler.compile, self.compiler._compile
        try:
            super().build_extensions()
        except Exception as err:
            cpu_only = [getattr(ext, "cpu_only", None) for ext in self.extensions]
            if not all(cpu_only):
                raise
            _say(f"the CUDA kernels failed to build ({type(err).__name__}: {str(err).strip()[:300]}; the "
                 "compiler's first error is above): building the op library with its CPU ops only")
            self.compiler.compile, self.compiler._compile = originals
            for ext, cpu in zip(self.extensions, cpu_only):
                # setuptools keeps its own bookkeeping on ext: take over the CPU build's settings, not the object.
                for attr in ("sources", "include_dirs", "library_dirs", "libraries", "define_macros",
                             "extra_compile_args", "extra_link_args", "language"):
                    setattr(ext, attr, getattr(cpu, attr))
                ext.cpu_only = None
            self.force = True
            super().build_extensions()


def _extensions():
    if os.environ.get("DBC_FAST_NO_EXT") == "1":
        _say("DBC_FAST_NO_EXT=1: no op library")
        return [], {}
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    # py_limited_api: torch's BuildExtension defines Py_LIMITED_API itself.
    cxx_flags = ["-O3", "-fopenmp"]
    common = dict(name="dbc_fast._C", extra_link_args=["-fopenmp"], py_limited_api=True)
    csrc = os.path.join(ROOT, "csrc")
    ext = cpp_extension.CppExtension(sources=cpp_sources, include_dirs=[csrc],
                                     extra_compile_args={"cxx": cxx_flags}, **common)
    cuda_home = _cuda_toolkit() if cu_sources else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _say(f"building CUDA kernels with {cuda_home} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        link_dir = _cudart_link_dir(cuda_home)
        cpu_only, ext = ext, cpp_extension.CUDAExtension(
            sources=cpp_sources + cu_sources, include_dirs=[csrc], library_dirs=[link_dir] if link_dir else [],
            define_macros=[("DBC_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]}, **common)
        ext.cpu_only = cpu_only
    build_ext = type("BuildOpLibrary", (_BuildOpLibrary, cpp_extension.BuildExtension), {})
    return [ext], {"build_ext": build_ext.with_options(no_python_abi_suffix=True)}


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
