"""Set one entry of this GPU's tile table (kernels/tiles/<gpu>.json), for an A/B of that entry alone.

Why: tune.py keeps the committed tile unless another is more than its NOISE (3 %) faster, and
a gain below that is told from noise only by timing both in one process (ab_kernel.py). This
writes the changed table; gpu_session.sh's ab-entry step copies kernels/ to ab/base first.

Run: python benchmarks/set_tile.py KEY N KERNEL BLOCK_M BLOCK_N WARPS STAGES TMA [--table PATH]
     e.g. D128-dense N1024 dq 128 64 8 3 true. Prints N's digits (for ab_kernel.py --n).
"""

import argparse
import json
import sys

KERNELS = ("fwd", "dkdv", "dq")


def set_entry(table: dict, key: str, n: str, kernel: str, tile: list) -> list:
    """Set table['tiles'][key][n][kernel] = tile; the entry it replaces. Names what is not in the table."""
    tiles = table["tiles"]
    if key not in tiles:
        raise SystemExit(f"KEY must be one of {sorted(tiles)}, got {key!r}")
    if n not in tiles[key]:
        raise SystemExit(f"N must be one of {sorted(tiles[key])}, got {n!r}")
    block_m, block_n, warps, stages = tile[:4]
    if not all(b >= 16 and b & (b - 1) == 0 for b in (block_m, block_n)):
        raise SystemExit("BLOCK_M and BLOCK_N must be powers of two >= 16 (the kernels' tl.arange), "
                         f"got {block_m}, {block_n}")
    if warps < 1 or warps & (warps - 1) or stages < 1:
        raise SystemExit(f"WARPS must be a power of two and STAGES at least 1, got {warps}, {stages}")
    old, tiles[key][n][kernel] = tiles[key][n][kernel], tile
    return old


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("key")
    ap.add_argument("n", help="the table's name for it, e.g. N1024")
    ap.add_argument("kernel", choices=KERNELS)
    ap.add_argument("tile", type=int, nargs=4, metavar="BLOCK_M BLOCK_N WARPS STAGES")
    ap.add_argument("tma", choices=("true", "false"))
    ap.add_argument("--table", help="default: this GPU's table in kernels/tiles/")
    args = ap.parse_args(argv)
    path = args.table
    if path is None:
        from flashverify.kernels.attention import device_slug, tiles_path
        path = tiles_path(device_slug("cuda"))
    with open(path) as f:
        table = json.load(f)
    tile = [*args.tile, args.tma == "true"]
    old = set_entry(table, args.key, args.n, args.kernel, tile)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    print(f"{path}: {args.key} {args.n} {args.kernel} {old} -> {tile}", file=sys.stderr)
    print(args.n.removeprefix("N"))


if __name__ == "__main__":
    main()
