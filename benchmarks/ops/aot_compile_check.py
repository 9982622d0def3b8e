"""Compile every Triton kernel of corp for a GPU architecture without a GPU, and report its resources.

``triton.compile`` with an explicit target runs the whole CUDA backend (TTIR → TTGIR → LLVM → PTX →
cubin through Triton's bundled ptxas) on the CPU. This catches what Triton's interpreter cannot:
constructs the compiler rejects, and register spills (``STACK``/``LOCAL`` bytes from cuobjdump's
resource usage) of each autotuned configuration. It does not run anything and measures no speed.

    python benchmarks/ops/aot_compile_check.py [--arch 90] [--quick]

Exit status 1 if any variant fails to compile. Each compile takes a few seconds on one core.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

# the kernels must be compiled, not interpreted
os.environ.pop("TRITON_INTERPRET", None)


def _compile(fn, signature: dict, constexprs: dict, options: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = dict(signature)
    full.update({k: "constexpr" for k in constexprs})
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    info = {"seconds": round(time.perf_counter() - start, 1)}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", fh.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m:
        info.update(reg=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))
    ptx = kernel.asm["ptx"]
    info["wgmma"] = ptx.count("wgmma.mma_async")
    info["mma"] = ptx.count("mma.sync")
    info["mma_loop_local_ops"] = _local_ops_in_mma_loop(sass)
    return info


def _local_ops_in_mma_loop(sass: str) -> int | None:
    """Local-memory loads/stores (spill traffic) inside the innermost loop that holds the MMAs.

    Loops are found from backward branches of the SASS listing; spills outside that loop (the
    output pointers kept across the loop, reloaded once per flush) do not slow the K loop down.
    """
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            lines.append((int(m[1], 16), m[2]))
    loops = []
    for addr, text in lines:
        b = re.search(r"\bBRA\s+(?:`\()?(?:\.L_x_\d+)?(0x[0-9a-f]+)?", text)
        if b and b[1] and int(b[1], 16) < addr:
            loops.append((int(b[1], 16), addr))
    mma = [a for a, t in lines if "HGMMA" in t or "HMMA" in t]
    if not mma or not loops:
        return None
    best = None
    for lo, hi in loops:
        if any(lo <= a <= hi for a in mma) and (best is None or hi - lo < best[1] - best[0]):
            best = (lo, hi)
    if best is None:
        return None
    return sum(1 for a, t in lines if best[0] <= a <= best[1] and re.match(r"(@!?P\d+\s+)?(LDL|STL)", t))


def _gram_cases(quick: bool):
    from corp.kernels import gram as kg

    sig = {"x_ptr": "*bf16", "out_ptr": "*fp64", "ocs_ptr": "*fp64", "N": "i32", "D": "i32", "T": "i32", "SPLIT": "i32",
           "stride_b": "i64", "stride_t": "i64", "stride_d": "i64", "stride_os": "i64", "stride_or": "i64",
           "stride_oc": "i64", "stride_ocs_s": "i64", "stride_ocs": "i64"}
    for dtype, ty, precisions in ((torch.bfloat16, "*bf16", ("ieee",)), (torch.float32, "*fp32", ("ieee", "tf32", "tf32x3"))):
        for precision in precisions[:1] if quick else precisions:
            for cfg in kg.cuda_configs(dtype)[:1] if quick else kg.cuda_configs(dtype):
                cfg = dict(cfg)
                opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                for add_to_out in (True, False):
                    consts = dict(IS_3D=False, UPCAST=False, INPUT_PRECISION=precision,
                                  ROUND_TF32=precision == "tf32", ADD_TO_OUT=add_to_out,
                                  PROMOTE=kg.PROMOTE_TOKENS, FLUSH=kg.FLUSH_TOKENS, **cfg)
                    yield (f"gram {str(dtype)[6:]} {precision} {cfg} {opts} split={'1' if add_to_out else '>1'}",
                           kg._gram_kernel, dict(sig, x_ptr=ty), consts, opts)
    rsig = {"ws_ptr": "*fp64", "dst_ptr": "*fp64", "SPLIT": "i32", "R": "i32", "C": "i32", "ws_s": "i64", "ws_b": "i64",
            "ws_r": "i64", "ws_c": "i64", "dst_b": "i64", "dst_r": "i64", "dst_c": "i64"}
    yield ("sum_splits", kg._sum_splits_kernel, rsig,
           dict(UPPER=True, BLOCK_R=kg._REDUCE_BLOCK, BLOCK_C=kg._REDUCE_BLOCK), dict(num_warps=4, num_stages=1))


def _attention_cases(quick: bool):
    from corp.kernels import attention_stats as ka

    sig = {"qkv_ptr": "*bf16", "gq_ptr": "*fp64", "gk_ptr": "*fp64", "score_ptr": "*fp64", "N": "i32", "T": "i32",
           "d": "i32", "HD": "i32", "stride_b": "i64", "stride_t": "i64", "stride_c": "i64"}
    sig.update({name: "i64" for name in ("sq_s", "sq_h", "sq_r", "sq_c", "sk_s", "sk_h", "sk_r", "sk_c",
                                         "ss_s", "ss_h", "ss_c")})
    for d in (80, 64) if quick else (80, 64, 40, 24):
        d0, d1 = ka.head_dim_blocks(d)
        for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
            for cfg in ka.cuda_configs(d)[:1] if quick else ka.cuda_configs(d):
                cfg = dict(cfg)
                opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                for add_to_out in (True, False):
                    consts = dict(D0=d0, D1=d1, IS_3D=False, UPCAST=False, INPUT_PRECISION="ieee", ROUND_TF32=False,
                                  ADD_TO_OUT=add_to_out, PROMOTE=256, FLUSH=32768, **cfg)
                    yield (f"attention d={d} {str(dtype)[6:]} {cfg} {opts} split={'1' if add_to_out else '>1'}",
                           ka._attention_stats_kernel, dict(sig, qkv_ptr=ty), consts, opts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel family")
    parser.add_argument("--only", choices=("gram", "attention"), default=None)
    args = parser.parse_args(argv)
    cases = []
    if args.only in (None, "gram"):
        cases += list(_gram_cases(args.quick))
    if args.only in (None, "attention"):
        cases += list(_attention_cases(args.quick))
    failures = 0
    print(f"sm_{args.arch}: {len(cases)} kernel variants")
    for name, fn, sig, consts, opts in cases:
        try:
            info = _compile(fn, sig, consts, opts, args.arch)
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            continue
        spill = " SPILLS IN THE MMA LOOP" if info.get("mma_loop_local_ops") else ""
        print(f"ok   {name}: {info}{spill}", flush=True)
    print(f"{len(cases) - failures}/{len(cases)} compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
