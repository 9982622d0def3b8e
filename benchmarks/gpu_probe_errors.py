"""Does a rejected call of the compiled ``corp::ridge_solve`` raise cleanly, or crash the process?

The compiled kernels: ``corp._compiled.module().ridge_solve_cpu`` on CPU tensors (the registered
op's CPU kernel is the PyTorch reference) and the registered op ``torch.ops.corp.ridge_solve`` on
CUDA tensors (its CUDA kernel is the compiled one, see corp/ops.py).

Each bad call runs in its own subprocess (a crash there cannot take this
script down); prints one line per case: the error message, or the signal.
With ``--gdb`` the first crashing case is re-run under ``cuda-gdb`` (or gdb)
in batch mode to print the native backtrace.

    python benchmarks/gpu_probe_errors.py [--gdb]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

CASES = {
    "cpu_dtype": "a, b, lam = mk('cpu'); op(a.float(), b, lam)",
    "cpu_growth": "a, b, lam = mk('cpu'); op(a, b, lam, 8, 1.0)",
    "cpu_negative_damping": "a, b, lam = mk('cpu'); op(a, b, -lam)",
    "cuda_dtype": "a, b, lam = mk('cuda'); op(a.float(), b, lam)",
    "cuda_damping_on_cpu": "a, b, lam = mk('cuda'); op(a, b, lam.cpu())",
    "torch_check_in_torch": "import torch; torch.linalg.cholesky(torch.ones(2, 3))",
}
PRELUDE = """
import torch
import corp.ops  # registers torch.ops.corp.*
from corp import _compiled
assert _compiled.available(), _compiled.load_error()
def op(a, b, lam, max_retries=8, growth=10.0):
    if a.device.type == 'cpu':
        return _compiled.module().ridge_solve_cpu(a, b, lam, max_retries, growth)
    return torch.ops.corp.ridge_solve(a, b, lam, max_retries, growth)
def mk(dev):
    a = torch.eye(5, dtype=torch.float64, device=dev)[None].repeat(2, 1, 1)
    return a, torch.ones(2, 5, 3, dtype=torch.float64, device=dev), torch.ones(2, dtype=torch.float64, device=dev)
try:
    {body}
    print('NO ERROR RAISED')
except RuntimeError as exc:
    print('raised:', str(exc).splitlines()[0][:150])
"""


def run_case(name: str, body: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PRELUDE.replace("{body}", body)], capture_output=True, text=True,
                          timeout=120)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    status = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    print(f"{name:<24} {status:<10} {tail}", flush=True)
    if proc.returncode != 0 and proc.stderr:
        print("   stderr:", " | ".join(proc.stderr.strip().splitlines()[-4:])[:600])
    return proc.returncode


def main() -> int:
    gdb = "--gdb" in sys.argv
    crashed = []
    for name, body in CASES.items():
        if name.startswith("cuda") and not __import__("torch").cuda.is_available():
            continue
        if run_case(name, body) < 0:
            crashed.append(name)
    if gdb and crashed:
        debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
        if debugger is None:
            print("no cuda-gdb / gdb for a native backtrace")
            return 1
        script = PRELUDE.replace("{body}", CASES[crashed[0]])
        print(f"=== native backtrace of {crashed[0]} ({debugger})", flush=True)
        env = dict(os.environ, CUDA_ENABLE_COREDUMP_ON_EXCEPTION="0")
        proc = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=150, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
        print("\n".join(lines[-45:]) or proc.stdout[-3000:] + proc.stderr[-2000:])
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
