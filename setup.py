"""Build the native kernels: fastser._C (CPU, always) and fastser._C_cuda (when nvcc is found).

Only setuptools and pybind11 are needed to build: the kernels take raw pointers, so nothing
here imports or links torch. FASTSER_BUILD_CUDA=0 skips the CUDA extension, =1 makes a missing
nvcc an error; unset, the CUDA extension is built whenever nvcc is found.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

CUDA_ARCHS = os.environ.get("FASTSER_CUDA_ARCHS", "80;90")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuda_home(nvcc):
    """The toolkit root holding include/cuda_runtime.h (nvcc on PATH may be a wrapper script)."""
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def compiler_accepts(compiler, flag):
    """True when the C++ compiler builds a trivial file with `flag` (e.g. -fopenmp)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            return True
        except Exception:
            return False


class BuildExt(build_ext):
    def build_extensions(self):
        if not shutil.which(self.compiler.compiler_so[0]):
            raise RuntimeError(
                f"fastser needs a C++17 compiler to build its CPU kernels; "
                f"'{self.compiler.compiler_so[0]}' was not found (install g++ or clang++)."
            )
        openmp = sys.platform != "darwin" and compiler_accepts(self.compiler, "-fopenmp")
        if not openmp:
            warnings.warn("fastser: the C++ compiler has no OpenMP; the CPU kernels run single-threaded")
        for ext in self.extensions:
            ext.extra_compile_args += ["-O3", "-std=c++17"]
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()

    def build_extension(self, ext):
        if ext.name != "fastser._C_cuda":
            return super().build_extension(ext)
        if os.environ.get("FASTSER_BUILD_CUDA", "").strip() == "1":
            self.compile_cuda_sources(ext)
            return super().build_extension(ext)
        try:  # the CUDA kernels are optional: a broken toolkit must not fail the install
            self.compile_cuda_sources(ext)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"fastser: building the CUDA kernels failed ({exc}); backend 'cuda' will be unavailable")

    def compile_cuda_sources(self, ext):
        """nvcc turns each .cu source into an object that the C++ link step picks up."""
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects += [self.nvcc_compile(src) for src in cu_sources]

    def nvcc_compile(self, src):
        nvcc = find_nvcc()
        obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
        os.makedirs(self.build_temp, exist_ok=True)
        gencode = []
        archs = [a for a in CUDA_ARCHS.split(";") if a]
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Icsrc", *gencode]
        print(" ".join(cmd))
        subprocess.check_call(cmd)
        return obj


def cuda_extension():
    want = os.environ.get("FASTSER_BUILD_CUDA", "").strip()
    if want == "0":
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if want == "1":
            raise RuntimeError("FASTSER_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        warnings.warn("fastser: nvcc not found; building without the CUDA kernels (backend 'cuda')")
        return []
    cuda_home = find_cuda_home(nvcc)
    if cuda_home is None:
        if want == "1":
            raise RuntimeError(f"FASTSER_BUILD_CUDA=1 but no CUDA toolkit headers were found beside {nvcc}")
        warnings.warn(f"fastser: found {nvcc} but no CUDA headers; building without the CUDA kernels")
        return []
    lib_dirs = [
        d
        for d in (
            os.path.join(cuda_home, "lib64"),
            os.path.join(cuda_home, "lib"),
            os.path.join(cuda_home, "targets", f"{os.uname().machine}-linux", "lib"),
        )
        if os.path.isdir(d)
    ]
    return [
        Pybind11Extension(
            "fastser._C_cuda",
            ["csrc/bindings_cuda.cpp", "csrc/center_loss_cuda.cu"],
            include_dirs=["csrc", os.path.join(cuda_home, "include")],
            library_dirs=lib_dirs,
            # the static runtime keeps the extension independent of which libcudart torch ships
            libraries=["cudart_static", "dl", "rt", "pthread"],
        )
    ]


extensions = [
    Pybind11Extension(
        "fastser._C", ["csrc/bindings.cpp", "csrc/center_loss_cpu.cpp", "csrc/mel_chain_cpu.cpp"], include_dirs=["csrc"]
    )
]
extensions += cuda_extension()

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
