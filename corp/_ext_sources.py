"""Sources of the compiled solver ``corp._C``, relative to the repository root.

The one list: setup.py reads it (without importing corp) and the opt-in JIT
build of :mod:`corp._compiled` compiles the same files.
"""
CPU_SOURCES = (
    "csrc/ridge_solve.cpp",
    "csrc/ridge_solve_cpu_base.cpp",
    "csrc/ridge_solve_cpu_avx2.cpp",
    "csrc/ridge_solve_cpu_avx512.cpp",
)
CUDA_SOURCES = ("csrc/ridge_solve_cuda.cu",)
