"""Cost of the mpmath oracle: one forward+backward query row, and one dK/dV key column.

python benchmarks/mp_row_cost.py [Nk] [D]   (CPU; default Nk = 8192, D = 128)
"""

import sys
import time

import mpmath

from flashverify.case import Case
from flashverify.mp_oracle import DEFAULT_PREC, MpOracle


def main(nk=8192, d=128):
    x = Case(heads_q=1, heads_kv=1, seqlen_q=8, seqlen_k=nk, head_dim=d).inputs()
    t = time.perf_counter()
    mp = MpOracle(x.q, x.k, x.v, x.do)
    setup = time.perf_counter() - t
    times = []
    for i in range(3):
        t = time.perf_counter()
        mp.row(0, 0, i)
        times.append(time.perf_counter() - t)
    print(f"mpmath {mpmath.__version__} (backend {mpmath.libmp.BACKEND}), prec {DEFAULT_PREC} bits: "
          f"Nk={nk} D={d}: setup {setup:.2f} s, one fwd+bwd row {min(times):.2f} s (best of 3)")
    t = time.perf_counter()
    mp.column(0, 0, 0)
    print(f"one dK/dV column over Nq=8 rows: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:3]])
