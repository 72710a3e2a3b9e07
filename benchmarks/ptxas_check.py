"""Compile the bundled kernels for Hopper (sm_90a) without a GPU and report what ptxas says:
wgmma serialization (warning C7515), registers, spills. Exit 1 if any kernel is serialized.

Why: ptxas serializing every wgmma of a kernel cost the dK/dV kernel about a third of its speed
through kernels v2-v3.1 (docs/performance.md), and nothing but ptxas's own log shows it; tile
tuning cannot fix it. The ptxas bundled with Triton decides: run this under the Triton the GPU
runs (the H100 image has triton 3.6; triton 3.8's ptxas does not warn for the same PTX).

Run: python benchmarks/ptxas_check.py [--gpu nvidia-h100-80gb-hbm3]   (tiles from that GPU's table)
     python benchmarks/ptxas_check.py --against ab/base [--only "dkdv"]   (PTX the same as that copy's?)

Each tile compiles as it runs: its loop's loads through TMA descriptors unless the table says
pointers (a tile name ending in 'p'); the ' pointers' variant compiles a TMA tile's fallback
(tensors TMA cannot take, attention._tma_rows).

--against DIR compiles each specialization from DIR's triton_kernels.py too (a copy of kernels/,
as ab_kernel.py takes) and says whether the PTX is the same, source line records aside. Why: a
change meant to leave the device code alone (a refactor, a host-side change) is then shown to
on a machine without a GPU; the same PTX through the same ptxas is the same kernel.
"""

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"   # compile, do not interpret (set before flashverify.kernels)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashverify.kernels import triton_kernels as tk  # noqa: E402

attn = importlib.import_module("flashverify.kernels.attention")   # the module (the package re-exports a function)

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
B, H, N = 2, 16, 4096   # contiguous (B, H, N, D) tensors, as in the speed grid


def _args(d, extra):
    """Launch arguments as the speed grid passes them (fp16, contiguous, no mask)."""
    ptr = {name: "*fp16" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptr["MASK"] = "*u8" if extra.get("MASK_KIND") == 1 else "*fp16"   # bool masks travel as uint8
    ptr.update(LSE="*fp32", STATS="*fp32", DELTA="*fp32", KEYLEN="*i32")
    strides = (H * N * d, N * d, d, 1)
    ints = dict(smb=0, smh=0, smm=N, smn=1, H=H, HKV=H, GROUP=1, NQ=N, NK=N, D=d, win_left=2 * N + 1,
                win_right=2 * N + 1, seed=0, STATS_LOGL=B * H * N)
    for prefix in ("sq", "sk", "sv", "so", "sdo", "sdq", "sdk", "sdv"):
        ints.update({prefix + s: v for s, v in zip("bhmd", strides)})
        ints.update({prefix + s: v for s, v in zip("bhnd", strides)})
    const = dict(BLOCK_D=d, EVEN_D=True, ALIGN_BOTTOM_RIGHT=False, KEYLEN_ON=False, MASK_KIND=0, DROPOUT=False,
                 DOT_PRECISION="ieee", PRECISE_EXP=False, FOLD_SCALE=True, EDGES=False, CHECK_ROWS=False, TMA=True)
    for k, v in extra.items():
        (const if k in const or k.startswith("BLOCK") else ints)[k] = v
    return ptr, ints, const


# The tensors each kernel's loop loads through TMA descriptors where it can (attention._tma_pair).
TMA_LOADS = {"_fwd_kernel": ("K", "V"), "_bwd_dkdv_kernel": ("Q", "DO"), "_bwd_dq_kernel": ("K", "V")}


def compile_log(kernel, d, tile, extra):
    """ptxas -v output, shared memory bytes and PTX for one specialization, signature built as
    Triton's launcher would."""
    ptr, ints, const = _args(d, dict(extra, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n))
    tma = const["TMA"] and any(p.name == "TMA" for p in kernel.params)   # an --against copy may predate TMA
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        name = p.name
        if p.is_constexpr:
            sig[name], constexprs[name] = "constexpr", const[name]
        elif tma and name in TMA_LOADS.get(kernel.fn.__name__, ()):
            rows = tile.block_n if name in ("K", "V") else tile.block_m
            sig[name] = f"tensordesc<fp16[1, 1, {rows}, {d}]>"   # as attention._tma_rows builds it
        elif name in ptr:
            sig[name], attrs[(i,)] = ptr[name], [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            sig[name] = "fp32"
        elif ints[name] == 1 and not p.do_not_specialize:
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", os.path.join(tmp, "k.ptx"), "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    return run.stdout + run.stderr, compiled.metadata.shared, compiled.asm["ptx"]


def _code(ptx):
    """The PTX without its source records (.loc, .file, debug sections): where a line of the
    kernel's source sits, not what it compiles to."""
    lines, debug = [], False
    for line in ptx.splitlines():
        stripped = line.strip()
        if stripped.startswith(".section") and ".debug" in stripped:
            debug = True
        if not debug and not stripped.startswith((".loc", ".file", "$L__")) and "debug" not in stripped:
            lines.append(line)
        if debug and stripped == "}":
            debug = False
    return "\n".join(lines)


def _base_kernels(base_dir):
    """triton_kernels.py of another copy of kernels/, loaded as its own module."""
    path = os.path.join(os.path.abspath(base_dir), "triton_kernels.py")
    if not os.path.exists(path):
        raise SystemExit(f"--against {base_dir!r} has no triton_kernels.py: give a copy of kernels/")
    spec = importlib.util.spec_from_file_location("base_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # Triton resolves the kernels' globals through their module
    spec.loader.exec_module(module)
    return module


# Opt-in shared memory per block on sm_90 (H100, H200): what Triton's launcher checks a kernel
# against before it raises OutOfResources (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SM90_SHARED_BYTES = 232448


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="nvidia-h100-80gb-hbm3", help="tile table to take the tiles from")
    ap.add_argument("--only", default="", help="check only entries whose 'tiles kernel' contains this (e.g. 'D128-dense dkdv')")
    ap.add_argument("--against", default=None, help="a copy of kernels/: say whether each PTX is the same as its")
    args = ap.parse_args()
    base = _base_kernels(args.against) if args.against else None
    table = attn.tuned_tiles(args.gpu)
    if not table:
        ap.error(f"--gpu: no tile table kernels/tiles/{args.gpu}.json")
    kernels = {"fwd": tk._fwd_kernel, "dkdv": tk._bwd_dkdv_kernel, "dq": tk._bwd_dq_kernel}
    variants = {"": {}, " dropout": dict(DROPOUT=True), " gqa": dict(GROUP=2, HKV=H // 2),
                " rows": dict(CHECK_ROWS=True), " boolmask": dict(MASK_KIND=1),
                " addmask": dict(MASK_KIND=2, FOLD_SCALE=False), " pointers": dict(TMA=False)}
    print(f"triton {triton.__version__}, ptxas {PTXAS}")
    serialized, too_big, checked, differ = 0, 0, 0, 0
    for key, by_n in sorted(table.items()):
        d = int(key.split("-")[0][1:])
        for name, kernel in kernels.items():
            tiles = {}   # each distinct tile once, with the tuned N that use it
            for n, config in sorted(by_n.items()):
                tiles.setdefault(getattr(config, name), []).append(f"{n // 1024}K")
            for tile, ns in tiles.items():
                for label, extra in variants.items():
                    if ((label == " rows" and name != "dkdv") or (label == " pointers" and not tile.tma)
                            or args.only not in f"{key} {name}"):
                        continue
                    checked += 1
                    constexprs = {"TMA": tile.tma, **extra, "EDGES": key.endswith("masked")}
                    log, shared, ptx = compile_log(kernel, d, tile, constexprs)
                    same = ""
                    if base is not None:
                        base_kernel = getattr(base, kernel.fn.__name__, None)
                        if base_kernel is None:
                            raise SystemExit(f"--against {args.against!r}: its triton_kernels.py has no "
                                             f"{kernel.fn.__name__}")
                        same_ptx = _code(ptx) == _code(compile_log(base_kernel, d, tile, constexprs)[2])
                        differ += not same_ptx
                        same = " same PTX" if same_ptx else " PTX DIFFERS"
                    bad, big = "C7515" in log, shared > SM90_SHARED_BYTES
                    serialized += bad
                    too_big += big
                    usage = " ".join(line.split(":", 1)[-1].strip() for line in log.splitlines()
                                     if "spill" in line or "Used" in line)
                    verdict = "SERIALIZED" if bad else "NO-FIT" if big else "ok"
                    where = (f"{tile.block_m}x{tile.block_n}w{tile.num_warps}s{tile.num_stages}{'' if tile.tma else 'p'}"
                             f" N{'/'.join(ns)}")
                    print(f"{verdict:10s} {key:12s} {name:4s}{label:10s} {where:22s} smem {shared} {usage}{same}",
                          flush=True)
    if not checked:
        ap.error(f"--only: no entry matches {args.only!r} (entries: '<D64|D128>-<dense|masked> <fwd|dkdv|dq>')")
    print(f"{serialized} serialized" if serialized else "no wgmma serialization")
    if base is not None:
        print(f"PTX differs from {args.against}'s in {differ} of {checked}" if differ
              else f"PTX the same as {args.against}'s in all {checked}")
    print(f"{too_big} over the {SM90_SHARED_BYTES} bytes of shared memory (launched with fewer stages)"
          if too_big else "every tile fits in shared memory as tuned")
    return 1 if serialized else 0


if __name__ == "__main__":
    sys.exit(main())
