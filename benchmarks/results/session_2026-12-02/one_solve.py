"""One solve of bench_tail.py's batch, for an instruction count under callgrind.

    PYTHONPATH=<tree> valgrind --tool=callgrind python one_solve.py {trf,lm} 2000
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import bench_tail as bt  # noqa: E402

from torchimize_scipy import batch_least_squares  # noqa: E402

y, p0 = bt.data(int(sys.argv[2]), 0)
res = batch_least_squares(bt.peaks, p0, jac=bt.peaks_jac, args=(y,), method=sys.argv[1],
                          return_jac=False)
print(float(res.cost.sum()))
