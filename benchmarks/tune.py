"""Measure the bundled kernel's tile shapes on this GPU; write kernels/tiles/<gpu>.json (GPU only).

For each head dim (64, 128) and mask (dense, causal), each kernel (forward, dK/dV, dQ) runs with
every candidate tile (block_m, block_n, num_warps, num_stages) at N = 1K, 4K, 16K (B = 32K / N,
H = 16, fp16, the speed grid's shapes). Candidates load through TMA descriptors, but for the
committed tile, which loads as the table says, so holding it compares the table as it is with what
would replace it. The overall winner has the lowest geometric mean of time over the fastest
candidate's at each N; at an N where another candidate is more than NOISE faster (beyond
do_bench's run-to-run spread), that one is taken for that N. A tile of the committed table stays
unless the choice beats it by more than NOISE (--fresh: ignore the committed table), first in the
candidates' timings (see choose), then again in interleaved timings of the two (see _paired), so a
re-tune changes only what it measured to be faster. The tile is then timed with its loads through
TMA descriptors and through pointers, interleaved, and takes the faster (the table's fifth value,
tma); a committed tile keeps its loads unless the other way is more than NOISE faster. The kernel
picks the tiles of the tuned N nearest its problem's (attention.default_config). The table serves
fp16 and bf16 (same tiles, same code path); float32 keeps the fixed tiles. Every timing is kept in
the file, so the choice can be audited.

A candidate whose output differs grossly from the fixed tiles' (normwise > 5 %, where a correct
tile differs by rounding, ~1e-3) is rejected as broken; the chosen table is then verified by the
property suite on the same GPU (benchmarks/gpu_session.sh props), like any kernel change.

Candidates compile first in parallel worker processes (Triton caches the binaries on disk: the
small warm-up problem has the same specialization as the timed ones), then are timed one at a
time in this process with triton.testing.do_bench.

Run: python benchmarks/tune.py [--out PATH] [--fresh]
"""

import argparse
import dataclasses
import importlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

TOKENS, H = 32768, 16
NS = (1024, 4096, 16384)
HEAD_DIMS = (64, 128)
FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (128, 32, 4, 3),
       (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3), (64, 32, 4, 4), (128, 64, 8, 2), (64, 64, 4, 2),
       (64, 64, 8, 3)]
DKDV = [(32, 128, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 2), (32, 64, 4, 3),
        (64, 64, 4, 3), (16, 128, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (128, 128, 8, 2),
        (64, 128, 8, 4), (32, 64, 4, 2)]
DQ = [(128, 32, 8, 2), (128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
      (128, 128, 8, 2), (64, 128, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 2)]
CANDIDATES = {"fwd": FWD, "dkdv": DKDV, "dq": DQ}
BROKEN = 0.05
NOISE = 0.03   # run-to-run spread of one do_bench timing on the H100 (2-3 %, sessions 6-8)
ROUNDS = 5     # interleaved timings of each of two configs before one replaces the other (_paired)


def _attn():
    """The kernel's module (the package re-exports a function of the same name)."""
    return importlib.import_module("flashverify.kernels.attention")


def _inputs(b, n, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, H, n, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(4)]


def _problem(q, k, v, causal, config):
    a = _attn()
    pb = a._check(q, k, v, causal, "top_left", None, None, None, None, 0.0, None, False, None)
    return dataclasses.replace(pb, config=config)


def _config(d, causal, kernel, tile):
    a = _attn()
    base = a.default_config(d, torch.float16, masked=causal)   # the fixed tiles (no table)
    return dataclasses.replace(base, **{kernel: a.Tile(*tile)})


def _run(q, k, v, do, causal, kernel, config, fwd_out=None):
    """The kernel's result under `config`: O for the forward, (dQ, dK, dV) for the backward ones."""
    a = _attn()
    pb = _problem(q, k, v, causal, config)
    if kernel == "fwd":
        return (a._forward(q, k, v, pb)[0],)
    o, stats = fwd_out
    return a._backward(q, k, v, o, stats, do, pb)


def _compile(job):
    """Worker: run one candidate on a small problem so Triton compiles and caches it."""
    d, causal, kernel, tile = job
    try:
        q, k, v, do = _inputs(1, 256, d)
        a = _attn()
        fwd_out = None
        if kernel != "fwd":   # the backward reads a forward's output: the fixed tiles', as in main()
            o, _, stats = a._forward(q, k, v, _problem(q, k, v, causal, a.default_config(d, torch.float16, masked=causal)))
            fwd_out = (o, stats)
        _run(q, k, v, do, causal, kernel, _config(d, causal, kernel, tile), fwd_out)
        torch.cuda.synchronize()
        return job, None
    except Exception as e:  # noqa: BLE001 - e.g. OutOfResources: the tile does not fit
        return job, f"{type(e).__name__}: {str(e)[:160]}"


def _tile_name(tile):
    return "x".join(map(str, tile[:2])) + f"w{tile[2]}s{tile[3]}"


def choose(timings, ns, held=None):
    """{N: candidate name} from timings {name: {"tile": ..., "N<n>": ms}}, also writing each
    complete candidate's "score" (geometric mean over N of its time over the fastest's).

    The overall winner (lowest score) serves every N, unless another candidate is more than
    NOISE faster at that N. A held tile (held: {N: name}, the committed table's) stays unless the
    choice is more than NOISE faster than it: the tiles set the summation order, so every change
    of tile moves this GPU's golden error figures, and a re-tune should change only what it
    measured to be faster (session 12 re-tuned 20 of 36 entries, most by less than NOISE).
    """
    complete = {nm: r for nm, r in timings.items() if all(f"N{n}" in r for n in ns)}
    best = {n: min(r[f"N{n}"] for r in complete.values()) for n in ns}
    for r in complete.values():
        r["score"] = math.exp(sum(math.log(r[f"N{n}"] / best[n]) for n in ns) / len(ns))
    overall = min(complete, key=lambda nm: complete[nm]["score"])
    chosen = {}
    for n in ns:
        fastest = min(complete, key=lambda nm: complete[nm][f"N{n}"])
        pick = fastest if complete[fastest][f"N{n}"] * (1 + NOISE) < complete[overall][f"N{n}"] else overall
        keep = (held or {}).get(n)
        if keep in complete and not complete[pick][f"N{n}"] * (1 + NOISE) < complete[keep][f"N{n}"]:
            pick = keep
        chosen[n] = pick
    return chosen


def _paired(problem, causal, kernel, config, tiles, do_bench):
    """{label: median ms} of `config` with each of {label: Tile} as `kernel`'s tile, timed in turn
    ROUNDS times, the order reversed every round. Why: the tuner decides on differences of a few %, and one
    do_bench timing moves more than that. Two timings of the same tile in one H200 tune run
    (session 17, tune.log: each chosen tile in the candidates' pass, then in the load pass) were
    2.6 % apart at the median, 5.2 % at N=1K and 9.6 % at most, the second mostly the slower.
    Alternating cancels drift between the two, and the median drops outliers."""
    q, k, v, do, fwd_out = problem
    configs = {label: dataclasses.replace(config, **{kernel: tile}) for label, tile in tiles.items()}
    times, order = {label: [] for label in configs}, list(configs)
    for r in range(ROUNDS):
        for label in order if r % 2 == 0 else order[::-1]:
            timed = configs[label]
            times[label].append(do_bench(lambda: _run(q, k, v, do, causal, kernel, timed, fwd_out), warmup=10, rep=40))
    return {label: statistics.median(ts) for label, ts in times.items()}


def _faster_loads(problem, causal, kernel, config, tile, do_bench):
    """{"tma": ms, "pointers": ms}: the tile timed with its loop's loads through TMA descriptors
    and through pointers (attention._tma_pair), interleaved (_paired). TMA is not faster
    everywhere (H200: the D=64 dense forward 2-6 % slower, the D=128 forward 2-13 % faster,
    docs/performance.md session 16)."""
    a = _attn()
    return _paired(problem, causal, kernel, config, {"tma": a.Tile(*tile, tma=True), "pointers": a.Tile(*tile, tma=False)},
                   do_bench)


def takes_tma(loads_ms, held=None):
    """Whether the tile loads through TMA, from _faster_loads' times: the faster way, but a
    committed tile's way (held: its tma) stays unless the other is more than NOISE faster. The
    results are bitwise the same either way, so this moves no golden figure; the hold keeps a
    re-tune from flipping entries on noise (session 17's run, one timing of each way and no hold,
    changed the loads of 8 of the entries whose tile it kept)."""
    tma, pointers = loads_ms["tma"], loads_ms["pointers"]
    if held is None:
        return tma <= pointers
    if held:
        return not pointers * (1 + NOISE) < tma
    return tma * (1 + NOISE) < pointers


def _rel(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def main(argv=None):
    from triton.testing import do_bench
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: kernels/tiles/<gpu>.json")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore the committed table: every choice by this run's timings alone "
                             "(default: a committed tile stays unless another is more than NOISE faster)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tune.py measures a GPU's kernels: no CUDA device here")
    a = _attn()
    slug = a.device_slug("cuda")
    out = args.out or a.tiles_path(slug)
    incumbents = {}   # the committed table's tiles, {key: {N: LaunchConfig}}; none: every choice fresh
    if not args.fresh:
        try:
            incumbents = a.tuned_tiles(slug)
        except ValueError as e:   # an older schema: the table this run writes replaces it
            print(f"not holding the committed tiles: {e}", flush=True)
    start = time.time()

    jobs = [(d, c, kern, t) for d in HEAD_DIMS for c in (False, True) for kern, ts in CANDIDATES.items() for t in ts]
    with mp.get_context("spawn").Pool(min(14, os.cpu_count() or 1)) as pool:
        failed = {job: err for job, err in pool.imap_unordered(_compile, jobs) if err}
    print(f"compiled {len(jobs)} candidates in {time.time() - start:.0f} s; {len(failed)} do not fit", flush=True)

    tiles, timings, rejected = {}, {}, {}
    for d in HEAD_DIMS:
        for causal in (False, True):
            key = f"D{d}-{'masked' if causal else 'dense'}"
            current = {n: a.default_config(d, torch.float16, masked=causal) for n in NS}   # fixed tiles
            timings[key] = {}
            for kernel in ("fwd", "dkdv", "dq"):   # dq is timed with the chosen dkdv tiles, and so on
                held = {n: getattr(incumbents[key][n], kernel) for n in NS if n in incumbents.get(key, {})}
                held_names = {n: _tile_name(dataclasses.astuple(t)) for n, t in held.items()}
                per_n, problems = {}, {}
                for n in NS:
                    q, k, v, do = _inputs(TOKENS // n, n, d)
                    o, _, stats = a._forward(q, k, v, _problem(q, k, v, causal, current[n]))
                    problems[n] = (q, k, v, do, (o, stats))
                    ref = _run(q, k, v, do, causal, kernel, current[n], (o, stats))
                    for tile in CANDIDATES[kernel]:
                        name = _tile_name(tile)
                        if (d, causal, kernel, tile) in failed:
                            continue
                        as_committed = held[n] if name == held_names.get(n) else a.Tile(*tile)   # its loads
                        config = dataclasses.replace(current[n], **{kernel: as_committed})
                        try:
                            got = _run(q, k, v, do, causal, kernel, config, (o, stats))
                            err = max(_rel(x, r) for x, r in zip(got, ref))
                        except Exception as e:  # noqa: BLE001 - a tile that fails at this size
                            failed[(d, causal, kernel, tile)] = f"N{n}: {type(e).__name__}: {str(e)[:160]}"
                            continue
                        if not err <= BROKEN:
                            rejected[f"{key}/{kernel}/{name}/N{n}"] = err
                            continue
                        ms = do_bench(lambda: _run(q, k, v, do, causal, kernel, config, (o, stats)),
                                      warmup=10, rep=40)
                        per_n.setdefault(name, {"tile": list(tile)})[f"N{n}"] = ms
                for n, name in choose(per_n, NS, held_names).items():
                    keep = held_names.get(n)
                    note = " (the committed tile, within NOISE of the fastest)" if name == keep else ""
                    if keep in per_n and name != keep:   # a change: confirmed in interleaved timings
                        ms = _paired(problems[n], causal, kernel, current[n],
                                     {"new": a.Tile(*per_n[name]["tile"]), "committed": held[n]}, do_bench)
                        per_n[name].setdefault("against_committed_ms", {})[f"N{n}"] = ms
                        if not ms["new"] * (1 + NOISE) < ms["committed"]:
                            name, note = keep, f" (the committed tile: {per_n[name]['tile']} was within NOISE of it, interleaved)"
                    chosen = per_n[name]
                    loads = _faster_loads(problems[n], causal, kernel, current[n], chosen["tile"], do_bench)
                    chosen.setdefault("loads_ms", {})[f"N{n}"] = loads
                    tma = takes_tma(loads, held[n].tma if name == keep else None)
                    current[n] = dataclasses.replace(current[n], **{kernel: a.Tile(*chosen["tile"], tma=tma)})
                    print(f"{key} {kernel} N{n}: {chosen['tile']} {chosen[f'N{n}']:.3f} ms{note}; loads: TMA "
                          f"{loads['tma']:.3f}, pointers {loads['pointers']:.3f} ms -> {'TMA' if tma else 'pointers'}",
                          flush=True)
                timings[key][kernel] = dict(sorted(per_n.items(), key=lambda kv: kv[1].get("score", 1e9)))
            tiles[key] = {f"N{n}": {kern: list(dataclasses.astuple(getattr(current[n], kern)))
                                    for kern in ("fwd", "dkdv", "dq")} for n in NS}

    table = {"schema": a.TILES_SCHEMA, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": __import__("triton").__version__, "tuned_dtype": "float16", "applies_to": ["float16", "bfloat16"],
             "shapes": {"tokens": TOKENS, "H": H, "N": list(NS)},
             "command": "python benchmarks/tune.py" + (" --fresh" if args.fresh else ""),
             "tiles": tiles, "timings_ms": timings, "rejected_as_broken": rejected, "did_not_fit": sorted(
                 f"D{d}-{'masked' if c else 'dense'}/{kern}/{t}: {e}" for (d, c, kern, t), e in failed.items())}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
