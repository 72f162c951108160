"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: catches code that the interpreter
accepts but the compiler rejects (non-constexpr globals, bad layouts, type errors in unrolled branches).

Run as ``TRITON_INTERPRET=0 python -m tests.kernels.compile_sm90``; prints one line per variant with
the registers and spill stack ptxas reports. Used by ``test_triton_compile.py`` in a subprocess, since
the test session itself runs the kernels interpreted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_core, triton_lens

TARGET = GPUTarget("cuda", 90, 128)
POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_kernel(
    fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int, num_stages: int = 3
):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    # what the launcher's specialisation gives real calls: 16-aligned pointers and multiple-of-16 sizes
    aligned = [n for n in names if n not in constexprs and (types[n].startswith("*") or types[n] == "i32")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(
        fn=fn,
        signature=signature,
        attrs=attrs,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"looplens-{os.getpid()}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    try:
        out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    finally:
        path.unlink()
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    return " ".join(part for part in line.split() if part.startswith(("REG:", "STACK:")))


def lens_variants():
    for dtype, k_t, topk, ref, (bn, bv, bd), precision in [
        ("bf16", 8, 10, True, (64, 128, 64), "tf32"),
        ("bf16", 8, 10, True, (64, 64, 64), "tf32"),
        ("fp16", 3, 5, False, (128, 128, 64), "tf32"),
        ("bf16", 0, 0, False, (128, 128, 64), "tf32"),
        ("fp32", 2, 3, True, (64, 128, 32), "ieee"),
    ]:
        types = {n: "*fp32" for n in triton_lens._lens_stats_kernel.arg_names}
        types.update(
            X=POINTER[dtype],
            W=POINTER[dtype],
            T="*i64",
            REF_IDX="*i64",
            OUT_CNT="*i32",
            OUT_TOPI="*i32",
            N="i32",
            V="i32",
            D="i32",
            stride_x="i32",
            stride_w="i32",
            stride_ref="i32",
        )
        flags = {
            "NUM_TARGETS": k_t,
            "KP": max(2, triton.next_power_of_2(k_t)),
            "TOPK": topk,
            "TKP": max(2, triton.next_power_of_2(topk)),
            "HAS_REF": ref,
            "UPCAST": False,
            "INPUT_PRECISION": precision,
            "BLOCK_N": bn,
            "BLOCK_V": bv,
            "BLOCK_D": bd,
        }
        name = f"lens {dtype} K={k_t} top{topk} ref={ref} tile={bn}x{bv}x{bd}"
        yield name, triton_lens._lens_stats_kernel, types, flags, 8


def core_variants():
    for dtype in ("bf16", "fp32"):
        p = POINTER[dtype]
        yield (
            f"rms_norm {dtype} residual d<=8192",
            triton_core._rms_norm_kernel,
            {
                "X": p,
                "R": p,
                "W": p,
                "Y": p,
                "stride_x": "i32",
                "stride_r": "i32",
                "stride_y": "i32",
                "D": "i32",
                "eps": "fp32",
            },
            {"HAS_RESIDUAL": True, "BLOCK_D": 8192},
            8,
        )
        yield (
            f"swiglu {dtype}",
            triton_core._swiglu_kernel,
            {"F_": p, "Y": p, "stride_f": "i32", "stride_y": "i32", "H": "i32"},
            {"BLOCK": 1024},
            4,
        )


def main() -> None:
    for name, fn, types, flags, warps in [*lens_variants(), *core_variants()]:
        print(f"{name}: {resources(compile_kernel(fn, types, flags, warps))}", flush=True)


if __name__ == "__main__":
    main()
