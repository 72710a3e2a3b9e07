"""Python API of the bundled kernel: argument checks, launch configuration, autograd.

Every argument is checked here, before Triton sees it, so that bad input gives a
``ValueError``/``TypeError`` naming the argument and what is accepted instead of
a crash inside a kernel or a silently wrong answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import threading
from dataclasses import dataclass

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from . import triton_kernels as tk

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
ALIGNMENTS = ("top_left", "bottom_right")
LOG2E = math.log2(math.e)


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = True   # the loop's tile loads through TMA descriptors where the tensors allow (_tma_pair)


@dataclass(frozen=True)
class LaunchConfig:
    fwd: Tile
    dkdv: Tile
    dq: Tile


TILES_SCHEMA = "flashverify.tiles/2"
TILES_DIR = os.path.join(os.path.dirname(__file__), "tiles")


def device_slug(device) -> str:
    """The GPU's name as a file-name slug ('nvidia-h100-80gb-hbm3'): names tile tables and golden files."""
    device = torch.device(device)
    return _slug_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _slug_of(index: int) -> str:
    name = torch.cuda.get_device_name(index)
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def tiles_path(slug: str) -> str:
    """kernels/tiles/<slug>.json: where benchmarks/tune.py writes a GPU model's tile table and
    tuned_tiles reads it."""
    return os.path.join(TILES_DIR, f"{slug}.json")


@functools.lru_cache(maxsize=None)
def tuned_tiles(slug: str) -> dict:
    """The tile table measured on this GPU model by benchmarks/tune.py (kernels/tiles/<slug>.json),
    or {} when none was measured: {'D<block_d>-<dense|masked>': {tuned N: LaunchConfig}}, 16-bit
    dtypes only. Tiles are per sequence length because the fastest tile is not the same at N=1K
    (many short programs) as at N=16K (H100, D=128 causal dQ: 64x32 fastest at 1K, 10 % slower at 16K)."""
    path = tiles_path(slug)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        table = json.load(f)
    if table.get("schema") != TILES_SCHEMA:
        raise ValueError(f"{path}: schema {table.get('schema')!r} is not {TILES_SCHEMA!r}; "
                         "re-measure it with benchmarks/tune.py")
    return {key: {int(n.lstrip("N")): LaunchConfig(*(_table_tile(entry[kernel]) for kernel in ("fwd", "dkdv", "dq")))
                  for n, entry in by_n.items()}
            for key, by_n in table["tiles"].items()}


def _table_tile(entry: list) -> Tile:
    """[block_m, block_n, num_warps, num_stages, tma]; an entry without tma was tuned before the
    kernels had TMA loads, so it keeps the pointer loads it was measured with."""
    return Tile(*entry) if len(entry) == 5 else Tile(*entry, tma=False)


def nearest_tuned(tuned_ns, seqlen: int) -> int:
    """The tuned sequence length closest to `seqlen` on a log scale (ties: the shorter)."""
    return min(sorted(tuned_ns), key=lambda n: abs(math.log2(n / seqlen)))


def block_d(head_dim: int) -> int:
    """The kernels' padded head dim (BLOCK_D): the next power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def default_config(head_dim: int, dtype: torch.dtype, masked: bool = False, device=None,
                   seqlen: int = 16384) -> LaunchConfig:
    """Tile shapes for a problem: the tuned table of this GPU model where one was measured (16-bit
    dtypes, `masked` = causal or windowed; the tiles of the tuned N nearest `seqlen`, the longer of
    Nq and Nk), else fixed shapes by head dim, smaller where registers or shared memory run short.
    Tiles change the summation order, so error figures are per GPU model."""
    if interpreting():  # numpy: fewer, larger programs are faster; 32 keeps edge tiles exercised
        t = Tile(32, 32)
        return LaunchConfig(t, t, t)
    if device is not None and dtype in (torch.float16, torch.bfloat16):
        tuned = tuned_tiles(device_slug(device)).get(f"D{block_d(head_dim)}-{'masked' if masked else 'dense'}")
        if tuned:
            return tuned[nearest_tuned(tuned, seqlen)]
    wide = dtype == torch.float32
    if head_dim <= 64:
        fwd, dkdv, dq = Tile(128, 64, 4, 3), Tile(32, 128, 4, 3), Tile(128, 32, 4, 3)
    elif head_dim <= 128:
        fwd, dkdv, dq = Tile(128, 64, 8, 3), Tile(32, 128, 8, 2), Tile(128, 32, 8, 2)
    else:
        fwd, dkdv, dq = Tile(64, 32, 8, 2), Tile(32, 64, 8, 1), Tile(64, 32, 8, 1)
    if wide:
        half = lambda t: Tile(max(16, t.block_m // 2), max(16, t.block_n // 2), t.num_warps, min(t.num_stages, 2))
        fwd, dkdv, dq = half(fwd), half(dkdv), half(dq)
    return LaunchConfig(fwd, dkdv, dq)


@dataclass(frozen=True)
class _Problem:
    """Checked arguments, in the form the kernels take."""
    scale: float
    windowed: bool  # causal or a sliding window: some blocks need the window tested score by score
    win_left: int
    win_right: int
    bottom_right: bool
    key_lengths: torch.Tensor | None
    mask: torch.Tensor | None  # expanded to (B, Hq, Nq, Nk); bool masks viewed as uint8
    mask_kind: int
    dropout_p: float
    seed: int
    dot_precision: str
    precise_exp: bool  # float32 inputs: natural-unit scores, correctly rounded exp/log (triton_kernels._exp)
    config: LaunchConfig

    @property
    def score_scale(self) -> float:
        """Multiplier from q.k to the kernels' score units (log2 domain unless precise_exp)."""
        return self.scale if self.precise_exp else self.scale * LOG2E


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, N, D), got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions (B, H, N, D), got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype must be one of float16, bfloat16, float32, got {t.dtype}")


def _check_device(q):
    if interpreting():
        if q.device.type != "cpu":
            raise ValueError(f"q is on {q.device}; under TRITON_INTERPRET=1 tensors must be on the cpu")
    elif q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}; the Triton kernel needs cuda tensors "
                         "(on a machine without a GPU, set TRITON_INTERPRET=1 before importing flashverify.kernels)")


def _check_window(causal, window):
    if window is None:
        return
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"window must be a pair (left, right) of ints >= 0 or None, got {window!r}")
    for side, val in zip(("left", "right"), window):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
            raise ValueError(f"window {side} must be an int >= 0 or None (unbounded), got {val!r}")
    if causal and window[1] not in (None, 0):
        raise ValueError(f"window=(left, right) with causal=True needs right 0 or None, got right={window[1]}; "
                         "causal already forbids keys after the diagonal")


def _window_bounds(causal, window, nq, nk):
    """(enabled, left, right) of a checked window, 'unbounded' encoded as a distance no query can reach."""
    unbounded = nq + nk + 1
    if window is None:
        return (True, unbounded, 0) if causal else (False, unbounded, unbounded)
    left, right = window
    if causal:
        right = 0
    left = unbounded if left is None else min(left, unbounded)
    right = unbounded if right is None else min(right, unbounded)
    return True, left, right


def _check_mask(attn_mask, B, H, nq, nk, device):
    if attn_mask is None:
        return None, tk.MASK_NONE.value
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, q on {device}; they must match")
    if attn_mask.dtype == torch.bool:
        kind = tk.MASK_BOOL.value
    elif attn_mask.dtype in SUPPORTED_DTYPES:
        kind = tk.MASK_ADD.value
        if attn_mask.requires_grad:
            raise ValueError("attn_mask.requires_grad=True is not supported: the kernel gives no gradient "
                             "for an additive mask; pass attn_mask.detach()")
        if torch.isnan(attn_mask).any() or torch.isposinf(attn_mask).any():
            raise ValueError("an additive attn_mask must hold finite values or -inf (NaN and +inf are not accepted)")
    else:
        raise TypeError(f"attn_mask.dtype must be bool (True = attend) or a float dtype "
                        f"(float16, bfloat16, float32; added to scores), got {attn_mask.dtype}")
    try:
        expanded = attn_mask.expand(B, H, nq, nk)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(B, Hq, Nq, Nk) = {(B, H, nq, nk)}") from None
    if kind == tk.MASK_BOOL.value:
        expanded = expanded.view(torch.uint8) if expanded.is_contiguous() else expanded.to(torch.uint8)
    return expanded, kind


def _check_key_lengths(key_lengths, B, nk, device):
    if key_lengths is None:
        return None
    if not isinstance(key_lengths, torch.Tensor) or key_lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError("key_lengths must be an int32/int64 tensor of shape (B,) or None")
    if tuple(key_lengths.shape) != (B,):
        raise ValueError(f"key_lengths must have shape (B,) = ({B},), got {tuple(key_lengths.shape)}")
    if key_lengths.device != device:
        raise ValueError(f"key_lengths is on {key_lengths.device}, q on {device}; they must match")
    if B and (key_lengths.min() < 0 or key_lengths.max() > nk):
        raise ValueError(f"key_lengths must lie in [0, Nk={nk}], got {key_lengths.tolist()}")
    return key_lengths.to(torch.int32).contiguous()


def _check_tensors(q, k, v):
    """The checks of q, k, v, which read their metadata only (so they also run on the fake
    tensors of a torch.compile trace)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    _check_device(q)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}; q, k, v must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, {name} {t.dtype}")
    B, H, nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, nk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"head dims differ: q has D={D}, k/v have D={Dk}; the kernel needs equal head dims")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"query heads Hq={H} must be a positive multiple of key/value heads Hkv={Hkv} (GQA/MQA)")
    if nq < 1 or nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={nq}, Nk={nk}")


def _check_options(causal, causal_alignment, window, scale, dropout_p, seed, blocks):
    """The checks of the arguments that are not tensors, which need no shapes (so they also run
    before torch.compile's custom op, whose schema would otherwise reject them first)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    _check_window(causal, window)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None (1/sqrt(D)), got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0 and seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                                 or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if blocks is not None and not (isinstance(blocks, (tuple, list)) and len(blocks) == 2
                                   and all(isinstance(x, int) and x >= 16 and x & (x - 1) == 0 for x in blocks)):
        raise ValueError(f"blocks must be (block_m, block_n), powers of two >= 16, got {blocks!r}")


def _check(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale,
           dropout_p, seed, allow_tf32, blocks) -> _Problem:
    _check_tensors(q, k, v)
    _check_options(causal, causal_alignment, window, scale, dropout_p, seed, blocks)
    B, H, nq, D = q.shape
    nk = k.shape[2]
    enabled, left, right = _window_bounds(causal, window, nq, nk)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if dropout_p > 0.0:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    else:
        seed = 0
    config = default_config(D, q.dtype, masked=enabled, device=q.device, seqlen=max(nq, nk))
    if blocks is not None:
        config = LaunchConfig(*(Tile(blocks[0], blocks[1], t.num_warps, t.num_stages)
                                for t in (config.fwd, config.dkdv, config.dq)))
    mask, mask_kind = _check_mask(attn_mask, B, H, nq, nk, q.device)
    return _Problem(
        scale=float(scale), windowed=enabled, win_left=left, win_right=right,
        bottom_right=causal_alignment == "bottom_right",
        key_lengths=_check_key_lengths(key_lengths, B, nk, q.device),
        mask=mask, mask_kind=mask_kind, dropout_p=float(dropout_p), seed=seed,
        dot_precision="tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee",
        precise_exp=_precise_exp(q.dtype, allow_tf32),
        config=config)


def _precise_exp(dtype, allow_tf32) -> bool:
    """float32 without tf32: natural-unit scores, correctly rounded exp/log (_Problem.precise_exp)."""
    return dtype == torch.float32 and not allow_tf32


_PLAIN_PROBLEMS: dict = {}   # _check's results for plain calls (see _checked)
_PLAIN_PROBLEMS_MAX = 1024


def _checked(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale,
             dropout_p, seed, allow_tf32, blocks) -> _Problem:
    """_check's result; for a plain call (no mask, key lengths, window, dropout or tile override)
    from memory when a call with the same shapes, dtypes, devices and flags passed _check before.

    Why: _check is 11-19 us of a forward's host time (H200's host, development CPU), and a call +
    synchronize at N=1K waits for it. The key holds every value _check reads for such a call,
    with its type (True and 1 hash alike), so a call gets the memory's answer only where _check
    would give it; any other call goes through _check. Its problems hold no tensors."""
    plain = (attn_mask is None and key_lengths is None and window is None and blocks is None
             and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
             and type(causal) is bool and type(allow_tf32) is bool and type(causal_alignment) is str
             and (scale is None or type(scale) is float) and type(dropout_p) in (float, int) and dropout_p == 0)
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
           causal, causal_alignment, scale, allow_tf32, interpreting()) if plain else None
    pb = _PLAIN_PROBLEMS.get(key) if plain else None
    if pb is None:
        pb = _check(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale,
                    dropout_p, seed, allow_tf32, blocks)
        if plain:
            if len(_PLAIN_PROBLEMS) >= _PLAIN_PROBLEMS_MAX:
                _PLAIN_PROBLEMS.clear()
            _PLAIN_PROBLEMS[key] = pb
    return pb


def _mask_args(pb: _Problem, fallback):
    mask = pb.mask if pb.mask is not None else fallback
    strides = pb.mask.stride() if pb.mask is not None else (0, 0, 0, 0)
    keylen = pb.key_lengths if pb.key_lengths is not None else fallback
    return mask, keylen, strides


def _flags(pb: _Problem, D: int):
    return dict(BLOCK_D=block_d(D), EVEN_D=D == block_d(D),
                ALIGN_BOTTOM_RIGHT=pb.bottom_right, KEYLEN_ON=pb.key_lengths is not None,
                MASK_KIND=pb.mask_kind, DROPOUT=pb.dropout_p > 0.0, DOT_PRECISION=pb.dot_precision,
                PRECISE_EXP=pb.precise_exp,
                # scale applied inside the exponent's FMA (triton_kernels._exponent_scale): needs a
                # positive scale (row max = max(s) * scale) and no additive mask (bias in score units)
                FOLD_SCALE=pb.score_scale > 0 and pb.mask_kind != tk.MASK_ADD.value)


def _edges(pb: _Problem, nk: int, block_n: int | None = None) -> bool:
    """Whether a kernel's loop can meet blocks that need masking score by score (triton_kernels._split):
    under a causal/sliding window or per-batch key lengths, and, for loops over key blocks (block_n
    given), when Nk is not a multiple of the block. Otherwise the kernels compile no edge code,
    which never ran for such problems but cost time (H200, with the scale folded into the
    exponent: D=128 dense backward 8-17 % faster, forward 1-8 %; docs/performance.md, v5)."""
    return pb.windowed or pb.key_lengths is not None or (block_n is not None and nk % block_n != 0)


def _logl_offset(rows: int) -> int:
    """Where the row statistics' log l starts (after the row max): padded to a multiple of 16
    floats, so its loads stay aligned and Triton compiles one kernel for every B * H * Nq."""
    return _cdiv(rows, 16) * 16


def _stats_numel(rows: int, precise_exp: bool) -> int:
    """Size of the forward's row statistics for the backward: row max and log l (float32 inputs,
    log l from _logl_offset on), else max + log l in one float (triton_kernels._row_stats)."""
    return (_logl_offset(rows) if precise_exp else 0) + rows


def _cdiv(a: int, b: int) -> int:
    """Ceiling division, for grids. triton.cdiv is a constexpr_function: 2.6-4 us a call from the
    host, where this is under 0.1 (the backward's host time counts at small N)."""
    return -(-a // b)


_STAGES_THAT_FIT: dict = {}


def _launch(kernel, grid, tile: Tile, *args, stream=None, **constexprs):
    """Launch `kernel` (on `stream`, else the current stream) with the tile's pipeline stages, or
    fewer where that many do not fit in shared memory. Why: tiles are tuned on unmasked problems,
    and an additive mask's tile takes shared memory in every stage (H100, D=128 masked dK/dV
    64x128 with 4 stages: 248,064 of 232,448 bytes). Stages only set how far loads run ahead of
    the arithmetic, so the results are bitwise those of the tuned tile (tests/test_kernel.py
    checks this on a GPU)."""
    key = (kernel, tile, tuple(constexprs.items()))   # each kernel has one call site: one keyword order
    stages = _STAGES_THAT_FIT.get(key, tile.num_stages)
    while True:
        try:
            _run(kernel, grid, args, constexprs, stream, num_warps=tile.num_warps, num_stages=stages)
            break
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
    _STAGES_THAT_FIT[key] = stages


# Compiled kernels by launch key (see _run): one entry per kernel variant and argument layout a
# process launches, emptied past _COMPILED_MAX (random shapes in a long property run).
_COMPILED: dict = {}
_COMPILED_MAX = 4096
_I32, _I64 = range(-2**31, 2**31), range(-2**63, 2**63)   # Triton's int types: i32, i64, else u64


def _run(kernel, grid, args, constexprs, stream=None, **options):
    """kernel[grid](*args, **constexprs, **options) on `stream` (else the current stream), through
    the compiled kernel's own launcher once Triton has compiled it for arguments with this launch
    key (_arg_key). A direct launch takes the stream as an argument: making it the current stream
    costs 10-15 us of host time on an H200's host (benchmarks/host_cost.py).

    Why: on every launch Triton's JITFunction.run binds and specializes each argument and builds
    a cache key: 19-56 us of host time on an H200's host, against 8-16 us for the compiled
    kernel's launcher alone (benchmarks/host_cost.py), and a call + synchronize at N=1K waits for
    it. The first launch of a key goes through JITFunction.run, which compiles (or finds) the
    kernel and returns it; later launches call it as JITFunction.run would. Triton's own path is
    taken for anything else: the interpreter, a launch hook (profilers),
    debug or instrumentation mode, a stand-in kernel, an argument type the key does not know."""
    stream_of, key = _direct_launch_possible(kernel), None
    if stream_of is not None:
        device = torch.cuda.current_device()
        try:
            key = (kernel, device, tuple(options.items()), tuple(constexprs.items()), _arg_key(kernel, args))
        except TypeError:
            pass
    entry = _COMPILED.get(key) if key is not None else None
    if entry is not None:
        compiled, tail = entry
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     stream_of(device) if stream is None else stream.cuda_stream,
                     compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
        return compiled
    with (contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)), _padded_lanes_quiet():
        compiled = kernel[grid](*args, **constexprs, **options)
    tail = _constexpr_tail(kernel, len(args), constexprs) if key is not None else None
    if tail is not None and hasattr(compiled, "packed_metadata"):
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        _COMPILED[key] = (compiled, tail)
    return compiled


def _padded_lanes_quiet():
    """Under the interpreter, numpy's overflow and invalid-value warnings off for the launch.
    Why: a tile's lanes past the problem's edge (rows loaded as 0) compute exps, casts and dots
    that overflow and are never stored. A GPU computes them silently; numpy warned ("overflow
    encountered in cast", "in exp2", "invalid value encountered in matmul": CI, session 19, on
    N=1 cases whose results were exact). Stored values are the properties' to check."""
    if not interpreting():
        return contextlib.nullcontext()
    import numpy as np
    return np.errstate(over="ignore", invalid="ignore")


def _direct_launch_possible(kernel):
    """The active driver's stream getter where _run may launch `kernel` directly, else None.
    (torch.compile never traces here: under it, attention() is two opaque custom ops.)"""
    if interpreting() or not isinstance(kernel, JITFunction) or kernel.pre_run_hooks:
        return None
    runtime = knobs.runtime
    if (runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls or runtime.debug
            or getattr(runtime, "add_stages_inspection_hook", None) is not None
            or knobs.compilation.instrumentation_mode):
        return None
    return driver.active.get_current_stream


def _arg_key(kernel, args) -> tuple:
    """What Triton specializes a compiled kernel on, or finer: each argument's type; a tensor's
    dtype and 16-byte alignment; a bool's or an int's value, or only an int's range (i32, i64,
    u64) for parameters the kernel does not specialize on (seed, win_left, ...); nothing more for
    a float (never specialized). TypeError for an argument of any other type."""
    types = tuple(map(type, args))
    tensors, descriptors, by_value, by_range = _key_getters(kernel, types)
    return (types, tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors(args)]),
            tuple([(d.base.dtype, tuple(d.block_shape), d.padding) for d in descriptors(args)]), by_value(args),
            tuple([(a in _I32, a in _I64) for a in by_range(args)]))


@functools.lru_cache(maxsize=256)
def _key_getters(kernel, types: tuple):
    """Getters of a launch's tensors, of the ints and bools keyed by value, and of the ints keyed
    by range, for this kernel and these argument types. Why: sorted once per signature, so that
    _arg_key runs no Python test per argument (a launch has 20-45: 12 us of the forward's host
    time as one conditional per argument, on the development CPU)."""
    unspecialized = _unspecialized(kernel)
    tensors, descriptors, by_value, by_range = [], [], [], []
    for i, t in enumerate(types):
        if t is torch.Tensor:
            tensors.append(i)
        elif t is TensorDescriptor:
            descriptors.append(i)
        elif t is int and i in unspecialized:
            by_range.append(i)
        elif t in (int, bool):
            by_value.append(i)
        elif t is not float:
            raise TypeError(f"no launch key for a {t.__name__}")
    return _getter(tensors), _getter(descriptors), _getter(by_value), _getter(by_range)


def _getter(positions: list):
    """args -> the tuple of the arguments at `positions` (operator.itemgetter returns one bare)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        one = operator.itemgetter(positions[0])
        return lambda args: (one(args),)
    return lambda args: ()


@functools.lru_cache(maxsize=None)
def _unspecialized(kernel) -> frozenset:
    """Positions of the kernel's do_not_specialize parameters."""
    return frozenset(p.num for p in kernel.params if p.do_not_specialize)


def _constexpr_tail(kernel, n_args: int, constexprs: dict):
    """The constexprs' values in the kernel's parameter order, as JITFunction.run passes every
    bound argument to the launcher; None unless the signature is n_args positional parameters
    followed by exactly these constexprs (no defaults to fill in)."""
    later = kernel.params[n_args:]
    if (len(kernel.params) < n_args or any(p.is_constexpr for p in kernel.params[:n_args])
            or [p.name for p in later] != [p.name for p in later if p.is_constexpr]
            or {p.name for p in later} != set(constexprs)):
        return None
    return tuple(constexprs[p.name] for p in later)


def _forward(q, k, v, pb: _Problem):
    B, H, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, nq), device=q.device, dtype=torch.float32)
    logl_at = _logl_offset(B * H * nq)
    stats = torch.empty(_stats_numel(B * H * nq, pb.precise_exp), device=q.device, dtype=torch.float32)
    mask, keylen, ms = _mask_args(pb, q)
    t = pb.config.fwd
    grid = (_cdiv(nq, t.block_m), B * H)
    flags = _flags(pb, D)
    k_rows, v_rows, tma = _tma_pair(k, v, t.block_n, flags["BLOCK_D"], t)
    _launch(
        tk._fwd_kernel, grid, t,
        q, k_rows, v_rows, o, lse, stats, mask, keylen, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *ms,
        H, H // Hkv, nq, nk, D, pb.score_scale, pb.win_left, pb.win_right, pb.dropout_p, pb.seed, logl_at,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, EDGES=_edges(pb, nk, t.block_n), TMA=tma, **flags)
    return o, lse, stats


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Whether the GPU has the Tensor Memory Accelerator (sm_90 on); the interpreter emulates it."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_rows(t, rows: int, block_d: int):
    """A TMA descriptor of `t` (B, H, N, D) that loads (1, 1, rows, block_d) blocks, or None where
    TMA cannot take `t`: float32 (its tf32 dots want other operand layouts), a GPU without TMA,
    a base or stride not 16-byte aligned, a stride of 0. Why: a loop's tile loads then issue from
    one thread, with no addresses in registers, and rows past N and columns past D load as zeros
    with no mask computed (H200: the D=128 forward 2-13 % faster, docs/performance.md session 16)."""
    strides = t.stride()
    b, h, n, d = strides
    if (t.dtype == torch.float32 or d != 1 or t.data_ptr() % 16 or (b | h | n) % 8 or not (b and h and n)
            or not _has_tma(t.device)):   # strides of 8 16-bit elements: 16 bytes; none 0 (an expanded dO)
        return None
    # As TensorDescriptor(t, shape, strides, block_shape) but without its __post_init__'s checks
    # (5 us a descriptor on the development CPU, against 1): the test above covers them.
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=list(t.shape), strides=list(strides),
                         block_shape=[1, 1, rows, block_d])
    return desc


_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}


def _tma_pair(a, b, rows: int, block_d: int, tile: Tile):
    """(a, b, True) as TMA descriptors (_tma_rows) where the tile takes TMA and both tensors can
    be, else (a, b, False) as they are: a kernel's loop loads its two tensors one way. Tiles
    choose because TMA is not faster everywhere (H200: the D=64 dense forward 2-6 % slower, the
    D=128 forward 2-13 % faster; kernels/tiles/nvidia-h200.json)."""
    if not tile.tma:
        return a, b, False
    a_rows, b_rows = _tma_rows(a, rows, block_d), _tma_rows(b, rows, block_d)
    if a_rows is None or b_rows is None:
        return a, b, False
    if a.is_cuda:
        _context_current(a.device)
    return a_rows, b_rows, True


_THIS_THREAD = threading.local()


def _context_current(device: torch.device):
    """Make `device`'s CUDA context current in this thread, once per thread. Why: Triton encodes
    each TMA descriptor (cuTensorMapEncodeTiled) before its launcher makes a context current, and
    a thread that has made no CUDA runtime call needing one has none, so the encode fails with
    "invalid device context" (H200, session 17: the property suite's call-timeout threads).
    A stream query is such a call, and does not wait."""
    if getattr(_THIS_THREAD, "device", None) != device:
        torch.cuda.current_stream(device).query()
        _THIS_THREAD.device = device


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device):
    """A second CUDA stream per device, for the dQ kernel (see _backward)."""
    return torch.cuda.Stream(device)


def _backward(q, k, v, o, stats, do, pb: _Problem):
    """dQ, dK, dV: the delta kernel, then the dK/dV and dQ kernels, independent of each other.

    On a GPU the dQ kernel runs on a second stream, beside dK/dV: each kernel alone ends in a
    partial wave of programs (the speed grid's 4,096 programs are 31.03 waves of one per SM on an
    H200) while the other's programs wait; on two streams the dQ kernel's programs fill the SMs
    that the dK/dV kernel's last wave leaves idle. Both only read what the delta kernel and the
    forward wrote, and write separate tensors, so the results are bitwise those of one stream.
    The side stream waits for the caller's stream before dQ and the caller's waits for it after,
    so the tensors are used and freed in the caller's stream order (no record_stream needed)."""
    B, H, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    flags = _flags(pb, D)
    # Everything but the launches first: the delta kernel is short (70 us at D=128 on an H200), and
    # host work between it and dK/dV's launch would leave the GPU idle.
    delta = torch.empty((B, H, nq), device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    mask, keylen, ms = _mask_args(pb, q)
    common = (H // Hkv, nq, nk, D, pb.score_scale, pb.scale, pb.win_left, pb.win_right, pb.dropout_p, pb.seed,
              _logl_offset(B * H * nq))
    on_gpu = q.device.type == "cuda"
    if on_gpu:
        caller, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
    _run(tk._bwd_delta_kernel, (_cdiv(nq, 64), B * H), (o, do, delta, *o.stride(), *do.stride(), H, nq, D),
         dict(BLOCK_M=64, BLOCK_D=flags["BLOCK_D"]))
    if on_gpu:   # the side stream starts after the delta kernel, before dK/dV (which it must not wait for)
        side.wait_stream(caller)
    t = pb.config.dkdv
    q_rows, do_rows, tma = _tma_pair(q, do, t.block_m, flags["BLOCK_D"], t)
    _launch(
        tk._bwd_dkdv_kernel, (_cdiv(nk, t.block_n), B * Hkv), t,
        q_rows, k, v, do_rows, stats, delta, dk, dv, mask, keylen,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *ms,
        H, Hkv, *common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, CHECK_ROWS=nq % t.block_m != 0,
        EDGES=_edges(pb, nk), TMA=tma, **flags)
    t = pb.config.dq
    k_rows, v_rows, tma = _tma_pair(k, v, t.block_n, flags["BLOCK_D"], t)
    _launch(
        tk._bwd_dq_kernel, (_cdiv(nq, t.block_m), B * H), t,
        q, k_rows, v_rows, do, stats, delta, dq, mask, keylen,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *ms,
        H, *common, stream=side if on_gpu else None,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, EDGES=_edges(pb, nk, t.block_n), TMA=tma, **flags)
    if on_gpu:
        caller.wait_stream(side)
    return dq, dk, dv


def _on_device_of(t):
    """Triton launches on the *current* CUDA device and stream: make that the tensors' device, so
    that tensors on cuda:1 while cuda:0 is current run on cuda:1 (not read across devices or fault)."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()   # the usual case, at no more host time than this test
    return torch.cuda.device(device)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pb):
        o, lse, stats = _forward(q, k, v, pb)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.pb = pb
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)   # LSE is non-differentiable: no zeros tensor (and kernel) for its gradient
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, stats = ctx.saved_tensors
        with _on_device_of(q):
            dq, dk, dv = _backward(q, k, v, o, stats, do, ctx.pb)
        return dq, dk, dv, None


def _with_unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v, *, causal=False, causal_alignment="top_left", window=None, key_lengths=None,
              attn_mask=None, scale=None, dropout_p=0.0, seed=None, return_lse=False,
              allow_tf32=False, blocks=None):
    """FlashAttention-2 forward (and, through autograd, backward) for (B, H, N, D) tensors.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv (GQA/MQA:
            query head h reads key/value head h // (Hq // Hkv), as torch's enable_gqa).
            float16, bfloat16 or float32; any strides.
        causal: forbid keys after the diagonal.
        causal_alignment: "top_left" (query i sees keys j <= i, torch SDPA) or
            "bottom_right" (query i sees keys j <= i + Nk - Nq, FlashAttention >= 2.1).
            The same alignment places the sliding window.
        window: (left, right) sliding window: query i sees keys j with
            -left <= j - diag(i) <= right; None on a side means unbounded.
        key_lengths: int tensor (B,): keys at positions >= key_lengths[b] are padding.
            With bottom_right, the diagonal ends at the last valid key.
        attn_mask: bool (True = attend) or float (added to the scaled scores), broadcastable
            to (B, Hq, Nq, Nk). No gradient flows to it.
        scale: softmax scale, default 1/sqrt(D).
        dropout_p, seed: dropout on the attention probabilities, Philox keyed by seed (an int
            in [0, 2**31); None draws one from torch's generator). The backward regenerates
            the same mask; :func:`dropout_mask` materializes it.
        return_lse: also return the log-sum-exp of the scaled scores, (B, Hq, Nq) float32.
        allow_tf32: let float32 dot products use tf32 (default: IEEE float32).
        blocks: (block_m, block_n) tile override, for testing edge tiles.

    Rows with no allowed key return O = 0, LSE = -inf, and zero gradients.
    The backward uses no atomics: gradients are bitwise deterministic.
    Under torch.compile the call is two custom ops (flashverify::attention_forward and
    attention_backward): one graph, no break, eager's bits.
    """
    if torch.compiler.is_compiling():
        o, lse = _compiled_attention(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale,
                                     dropout_p, seed, allow_tf32, blocks)
        return (o, lse) if return_lse else o
    pb = _checked(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale,
                  dropout_p, seed, allow_tf32, blocks)
    q, k, v = _with_unit_last_stride(q), _with_unit_last_stride(k), _with_unit_last_stride(v)
    with _on_device_of(q):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            o, lse = _FlashAttention.apply(q, k, v, pb)
        else:   # no graph to record: skip autograd's bookkeeping (host time counts at small N)
            o, lse, _ = _forward(q, k, v, pb)
    return (o, lse) if return_lse else o


# torch.compile: attention() as two custom ops, forward and backward, which dynamo records as
# opaque calls. Why: traced, the host code (the tile table's lru_caches and file stat, Triton's
# launcher) broke the graph at every launch and warned (H200, session 18: six warnings in one
# test), and fullgraph=True failed. The ops run the eager functions above, so compiled calls
# give eager's bits. Their schemas take attention()'s arguments, checked first by
# _check_options; a window side or seed of None travels as -1, which no checked value is.
_OPTIONS_SCHEMA = ("bool causal, str causal_alignment, int[]? window, float? scale, float dropout_p, int seed, "
                   "bool allow_tf32, int[]? blocks")


def _compiled_attention(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale,
                        dropout_p, seed, allow_tf32, blocks):
    _check_tensors(q, k, v)
    _check_options(causal, causal_alignment, window, scale, dropout_p, seed, blocks)
    options = (causal, causal_alignment, None if window is None else [-1 if w is None else w for w in window],
               None if scale is None else float(scale), float(dropout_p),
               -1 if seed is None or dropout_p == 0 else seed,   # eager ignores the seed without dropout
               bool(allow_tf32), None if blocks is None else list(blocks))
    o, lse, _, _ = torch.ops.flashverify.attention_forward(q, k, v, key_lengths, attn_mask, *options)
    return o, lse


def _problem_of(q, k, v, key_lengths, attn_mask, causal, causal_alignment, window, scale, dropout_p, seed,
                allow_tf32, blocks):
    """_checked's problem from a custom op's arguments (their -1s back to None)."""
    window = None if window is None else tuple(None if w == -1 else w for w in window)
    return _checked(q, k, v, causal, causal_alignment, window, key_lengths, attn_mask, scale, dropout_p,
                    None if seed == -1 else seed, allow_tf32, None if blocks is None else tuple(blocks))


def _forward_op(q, k, v, key_lengths, attn_mask, *options):
    """(O, LSE, row statistics, the seed used: a CPU int64 scalar, for the backward to regenerate
    the dropout mask of a seed drawn here)."""
    pb = _problem_of(q, k, v, key_lengths, attn_mask, *options)
    q, k, v = _with_unit_last_stride(q), _with_unit_last_stride(k), _with_unit_last_stride(v)
    with _on_device_of(q):
        o, lse, stats = _forward(q, k, v, pb)
    return o, lse, stats, torch.tensor(pb.seed, dtype=torch.int64)


def _forward_fake(q, k, v, key_lengths, attn_mask, causal, causal_alignment, window, scale, dropout_p, seed,
                  allow_tf32, blocks):
    _check_tensors(q, k, v)
    B, H, nq, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, nq), dtype=torch.float32),
            q.new_empty(_stats_numel(B * H * nq, _precise_exp(q.dtype, allow_tf32)), dtype=torch.float32),
            torch.empty((), dtype=torch.int64, device="cpu"))


def _backward_op(q, k, v, o, stats, do, seed_used, key_lengths, attn_mask, causal, causal_alignment, window,
                 scale, dropout_p, seed, allow_tf32, blocks):
    pb = _problem_of(q, k, v, key_lengths, attn_mask, causal, causal_alignment, window, scale, dropout_p,
                     int(seed_used), allow_tf32, blocks)
    q, k, v = _with_unit_last_stride(q), _with_unit_last_stride(k), _with_unit_last_stride(v)
    with _on_device_of(q):
        return _backward(q, k, v, o, stats, do, pb)


def _backward_fake(q, k, v, o, stats, do, seed_used, key_lengths, attn_mask, *options):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _op_setup_context(ctx, inputs, output):
    q, k, v, key_lengths, attn_mask, *options = inputs
    o, lse, stats, seed_used = output
    ctx.save_for_backward(q, k, v, o, stats, seed_used, key_lengths, attn_mask)
    ctx.options = options
    ctx.mark_non_differentiable(lse, stats, seed_used)   # as in eager: no gradient flows from LSE


def _op_backward(ctx, do, *_):
    q, k, v, o, stats, seed_used, key_lengths, attn_mask = ctx.saved_tensors
    if do is None:   # only LSE was used
        do = torch.zeros_like(o)
    grads = torch.ops.flashverify.attention_backward(q, k, v, o, stats, do, seed_used, key_lengths, attn_mask,
                                                     *ctx.options)
    return (*grads, None, None, *(None for _ in ctx.options))


def _register_ops():
    """Once per process: a second copy of this module (ab_kernel.py's baseline) leaves the first's."""
    if hasattr(torch.ops.flashverify, "attention_forward"):
        return
    forward = torch.library.custom_op(
        "flashverify::attention_forward", _forward_op, mutates_args=(),
        schema=f"(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, Tensor? attn_mask, {_OPTIONS_SCHEMA})"
               " -> (Tensor, Tensor, Tensor, Tensor)")
    forward.register_fake(_forward_fake)
    backward = torch.library.custom_op(
        "flashverify::attention_backward", _backward_op, mutates_args=(),
        schema=f"(Tensor q, Tensor k, Tensor v, Tensor o, Tensor stats, Tensor do, Tensor seed_used, "
               f"Tensor? key_lengths, Tensor? attn_mask, {_OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)")
    backward.register_fake(_backward_fake)
    forward.register_autograd(_op_backward, setup_context=_op_setup_context)


_register_ops()


def dropout_mask(seed: int, shape, dropout_p: float, device="cpu") -> torch.Tensor:
    """The bool keep-mask (B, Hq, Nq, Nk) that :func:`attention` uses for this seed and p."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if len(shape) != 4 or any((not isinstance(s, int)) or s < 1 for s in shape):
        raise ValueError(f"shape must be (B, Hq, Nq, Nk) of positive ints, got {shape!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    B, H, nq, nk = shape
    device = torch.device(device)
    run_on = torch.device("cuda") if (device.type == "cpu" and not interpreting()) else device
    out = torch.empty(shape, dtype=torch.uint8, device=run_on)
    grid = (_cdiv(nq, 32), _cdiv(nk, 32), B * H)
    with _on_device_of(out):
        tk._dropout_mask_kernel[grid](out, seed, float(dropout_p), H, nq, nk, BLOCK_M=32, BLOCK_N=32)
    return out.bool().to(device)


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on (B, H, N, D) inputs.

    Same semantics (top-left causal, bool mask True = attend, float mask added, GQA only
    with enable_gqa), with two documented differences: fully masked rows give 0, not NaN;
    dropout uses the kernel's Philox stream seeded from torch's generator.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be given (as torch SDPA)")
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4:
        if not enable_gqa and q.shape[1] != k.shape[1]:
            raise ValueError(f"q has {q.shape[1]} heads and k has {k.shape[1]}: pass enable_gqa=True for GQA/MQA")
    return attention(q, k, v, causal=bool(is_causal), attn_mask=attn_mask, scale=scale,
                     dropout_p=dropout_p)
