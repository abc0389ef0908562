"""Build and install rfcn-tf.

`pip install .` (or `pip install -e .`) compiles the PSRoIPool op library
`rfcn_tf/ops/_psroi_pool_ops*.so` against the TensorFlow it will run with,
using the compile and link flags from `tf.sysconfig`.

CUDA kernels are compiled into the same library when `nvcc` is found (on PATH
or under $CUDA_HOME/bin, /usr/local/cuda/bin). `RFCN_TF_CUDA=1` forces them
(and fails if nvcc is missing); `RFCN_TF_CUDA=0` builds a CPU-only library.
`RFCN_TF_CUDA_ARCHS` overrides the list of SM architectures, e.g. "80;90".
The CUDA runtime is linked statically, so the library loads and runs its CPU
kernel on a machine with no GPU and no driver.

The build prints one line saying whether it compiles the CUDA kernels (or why
not); pip shows it only with `pip install -v`. `python -m rfcn_tf.ops` reports
the installed library and the devices it has kernels for.
"""

import os
import shutil
import subprocess

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

OP_DIR = os.path.join("custom_ops", "psroi_pool")
CPU_SOURCES = ["psroi_pool_ops.cc", "psroi_pool_kernels.cc"]
CUDA_SOURCES = ["psroi_pool_kernels.cu.cc"]
HEADERS = ["psroi_pool_math.h", "psroi_pool_launch.h"]
DEFAULT_CUDA_ARCHS = "75;80;86;89;90"


def _find_nvcc():
    """Returns the path of nvcc, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def _want_cuda():
    """Decides whether CUDA kernels are built; returns the nvcc path or None."""
    forced = os.environ.get("RFCN_TF_CUDA")
    nvcc = _find_nvcc()
    if forced == "0":
        print("rfcn-tf: RFCN_TF_CUDA=0, building the CPU-only PSRoIPool library")
        return None
    if forced == "1" and nvcc is None:
        raise RuntimeError("rfcn-tf: RFCN_TF_CUDA=1 but nvcc was not found on PATH, "
                           "$CUDA_HOME/bin or /usr/local/cuda/bin")
    if forced not in (None, "", "0", "1"):
        raise RuntimeError(f"rfcn-tf: RFCN_TF_CUDA must be 0 or 1, got {forced!r}")
    if nvcc is None:
        print("rfcn-tf: nvcc not found, building the CPU-only PSRoIPool library")
    return nvcc


def _cuda_home(nvcc):
    """Returns the CUDA toolkit root that `nvcc` uses (nvcc may be a wrapper script)."""
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True, check=False)
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line[len("#$ TOP="):].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvcc_release(nvcc):
    """The CUDA release of `nvcc` as (major, minor), or None if it cannot be read."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if "release " in line:
            major, _, minor = line.split("release ", 1)[1].split(",")[0].partition(".")
            if major.isdigit() and minor.isdigit():
                return int(major), int(minor)
    return None


def _note_cuda_mismatch(nvcc, tf):
    """Prints a note when nvcc's CUDA major version differs from TensorFlow's.

    The kernels run on the CUDA runtime they are linked with (statically), so they
    need a driver for nvcc's CUDA version, which may be newer than the one TensorFlow
    needs. Where the driver is too old the GPU kernels fail at run time and
    implementation="auto" falls back to the portable op.
    """
    release = _nvcc_release(nvcc)
    tf_cuda = tf.sysconfig.get_build_info().get("cuda_version") or ""
    tf_major = tf_cuda.split(".")[0]
    if release and tf_major.isdigit() and release[0] != int(tf_major):
        print(f"rfcn-tf: note: nvcc is CUDA {release[0]}.{release[1]}, TensorFlow was built "
              f"with CUDA {tf_cuda}: the PSRoIPool GPU kernels need a driver that supports "
              f"CUDA {release[0]}; on older drivers they fail and implementation='auto' "
              f"uses the portable op. To match TensorFlow, build with a CUDA {tf_major} "
              "toolkit's nvcc first on PATH.")


def _run(cmd):
    print(" ".join(cmd), flush=True)
    subprocess.check_call(cmd)


class TensorFlowOpExtension(Extension):
    """A TensorFlow custom-op library compiled with tf.sysconfig's flags."""

    def __init__(self, name):
        sources = [os.path.join(OP_DIR, s) for s in CPU_SOURCES + CUDA_SOURCES]
        super().__init__(name, sources=sources,
                         depends=[os.path.join(OP_DIR, h) for h in HEADERS])


class BuildTensorFlowOp(build_ext):
    """Compiles TensorFlowOpExtension with g++ (and nvcc) instead of distutils."""

    def build_extension(self, ext):
        if not isinstance(ext, TensorFlowOpExtension):
            return super().build_extension(ext)
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = os.path.abspath(self.build_temp)
        os.makedirs(tmp, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        tf_cflags = tf.sysconfig.get_compile_flags()
        tf_lflags = tf.sysconfig.get_link_flags()
        # -ffp-contract=off: no fused multiply-add, so bin boundaries match the
        # CUDA kernels (see psroi_pool_math.h).
        cflags = ["-std=c++17", "-O3", "-fPIC", "-ffp-contract=off", "-Wall", "-Wno-sign-compare",
                  "-Wno-deprecated-declarations"] + tf_cflags
        objects = []
        ldflags = []

        nvcc = _want_cuda()
        if nvcc:
            _note_cuda_mismatch(nvcc, tf)
            cuda_home = _cuda_home(nvcc)
            archs = os.environ.get("RFCN_TF_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")
            gencode = []
            for arch in archs:
                gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
            for src in CUDA_SOURCES:
                obj = os.path.join(tmp, src + ".o")
                _run([nvcc, "-c", "-x", "cu", "-std=c++17", "-O3", "--expt-relaxed-constexpr",
                      "-Xcompiler", "-fPIC", "-I", OP_DIR] + gencode +
                     [os.path.join(OP_DIR, src), "-o", obj])
                objects.append(obj)
            cflags += ["-DGOOGLE_CUDA=1", "-I", os.path.join(cuda_home, "include")]
            # cudart_static goes before libtensorflow_framework, which exports
            # cudart-named stubs, and its symbols are kept local to this library
            # so the kernels always use the runtime they were compiled with.
            ldflags += ["-L", os.path.join(cuda_home, "lib64"), "-lcudart_static", "-ldl",
                        "-lrt", "-lpthread", "-Wl,--exclude-libs,libcudart_static.a"]
            print(f"rfcn-tf: building PSRoIPool with CUDA kernels for sm_{','.join(archs)}")

        for src in CPU_SOURCES:
            obj = os.path.join(tmp, src + ".o")
            _run([cxx, "-c", os.path.join(OP_DIR, src), "-o", obj, "-I", OP_DIR] + cflags)
            objects.append(obj)
        _run([cxx, "-shared", "-o", output] + objects + ldflags + tf_lflags)


DEPLOY_REQUIRES = [
    "ai-edge-litert==2.3.*",
    "tf2onnx==1.17.*",
    "onnx==1.23.*",
    "onnxruntime==1.31.*",
    "tensorflow-serving-api==2.20.*",
]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="rfcn-tf",
    version="0.1.0",
    description="R-FCN object detection for TensorFlow/Keras with a compiled PSRoIPool op",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rfcn_tf", "rfcn_tf.*"]),
    ext_modules=[TensorFlowOpExtension("rfcn_tf.ops._psroi_pool_ops")],
    cmdclass={"build_ext": BuildTensorFlowOp},
    install_requires=[
        "tensorflow==2.20.0",
        "tf-models-official==2.20.*",
        "tf-keras==2.20.*",
        "numpy",
        "pycocotools",
        "absl-py",
        "pyyaml",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # Deployment runtimes and converters (rfcn_tf.convert, scripts/serving_client.py),
        # pinned to the versions tested with TensorFlow 2.20 (tensorflow-serving-api 2.21
        # would pull TensorFlow 2.21).
        "deploy": DEPLOY_REQUIRES,
        "test": ["pytest", "pytest-timeout"] + DEPLOY_REQUIRES,
        # bench/run_all.py: the plot, and the TFLite runtime for the TFLite timings.
        "bench": ["matplotlib", "ai-edge-litert==2.3.*"],
    },
    zip_safe=False,
)
