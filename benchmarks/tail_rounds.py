"""Where the wall time of ``bench_tail.py``'s batch goes: rounds by live rows, and stages.

Issue 14's tail: a batch runs until its slowest problem stops, one loop round
(one trial per running problem) at a time, so about 1,200 rounds of a few
rows each follow the first rounds of the whole chunk. This script solves
``bench_tail.py``'s batch (``--B`` datasets, numpy model, analytic Jacobian)
once to warm up and once measured, and prints

* per class of live rows (rows in the round; before and after the last block
  joined): the rounds, their wall and process-CPU time, and the time per
  round, from a clock read at the start of each round's step proposal;
* with ``--stages``, the calling thread's CPU time by stage of the rounds
  (the step rule's ``build_model``, ``propose_step``, ``assess_trial``,
  ``measure_optimality``, the adapters of ``fun``/``jac`` with the user's
  code inside them, ``Problem.linearize``); what is left is the loop's own
  bookkeeping (selections, merges, compaction, host scalars).

The instrumentation wraps methods, so absolute figures carry a small
overhead; the split between classes and stages is what it is for. Under a
drifting load compare only runs made close together (or use the interleaved
``bench_tail.py --before``).

Usage::

    PYTHONPATH=$PWD python benchmarks/tail_rounds.py [--B 2000] [--method trf] [--stages]
"""

from __future__ import annotations

import collections
import time

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import bench_tail as bt
import numpy as np
from _common import base_parser, setup

import torchimize_scipy._engine.loop as loop
from torchimize_scipy import batch_least_squares
from torchimize_scipy._engine.problem import Problem
from torchimize_scipy._engine.steps import RULES
from torchimize_scipy._user_functions import VectorizedFunction

ROW_CLASSES = [(0, 5), (5, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 1000),
               (1000, 10**9)]
STAGES = ("build_model", "propose_step", "assess_trial", "measure_optimality", "after_jacobian")


def _wrap(obj, name: str, label: str, acc: collections.Counter, depth: list) -> None:
    """Add the calling thread's CPU time in ``obj.name`` (outermost calls) to ``acc``."""
    f = getattr(obj, name)

    def timed(*a, **k):
        if depth[0]:
            return f(*a, **k)
        depth[0] += 1
        t = time.thread_time()
        try:
            return f(*a, **k)
        finally:
            acc[label] += time.thread_time() - t
            depth[0] -= 1

    setattr(obj, name, timed)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--B", type=int, default=2000)
    p.add_argument("--method", default="trf", choices=("trf", "lm"))
    p.add_argument("--stages", action="store_true", help="CPU time by stage")
    args = p.parse_args()
    setup(args)
    y, p0 = bt.data(args.B, args.seed)
    rule_cls = RULES[args.method]
    marks: list[tuple[float, float, int, bool]] = []
    streaming = [True]
    run = loop._run

    def counted_run(problem, rule, state, out, on_finish, on_iteration, refill, capacity, blas):
        def watched(room):
            more = refill(room)
            streaming[0] = more is not None
            return more
        streaming[0] = refill is not None
        return run(problem, rule, state, out, on_finish, on_iteration,
                   watched if refill is not None else None, capacity, blas)

    propose = rule_cls.propose_step

    def marked(self, problem, state):
        marks.append((time.perf_counter(), time.process_time(), state["x"].shape[0],
                      streaming[0]))
        return propose(self, problem, state)

    loop._run, rule_cls.propose_step = counted_run, marked
    acc: collections.Counter = collections.Counter()
    try:
        kw = dict(jac=bt.peaks_jac, args=(y,), method=args.method, return_jac=False)
        batch_least_squares(bt.peaks, p0, **kw)
        if args.stages:
            depth = [0]
            for name in STAGES:
                if name in vars(rule_cls):
                    _wrap(rule_cls, name, name, acc, depth)
            _wrap(Problem, "linearize", "linearize", acc, depth)
            _wrap(VectorizedFunction, "__call__", "fun/jac adapters (user code inside)", acc,
                  depth)
        marks.clear()
        t0, w0 = time.thread_time(), time.perf_counter()
        c0 = time.process_time()
        res = batch_least_squares(bt.peaks, p0, **kw)
        thread_cpu, wall, cpu = (time.thread_time() - t0, time.perf_counter() - w0,
                                 time.process_time() - c0)
    finally:
        loop._run, rule_cls.propose_step = run, propose
    a = np.array(marks, dtype=float)
    dt, dc = np.diff(a[:, 0]), np.diff(a[:, 1])
    rows, more = a[:-1, 2], a[:-1, 3] == 1
    print(f"{args.method}, B = {args.B:,}: wall {wall:.2f} s, process CPU {cpu:.2f} s, "
          f"{len(marks)} rounds, max nfev {int(np.max(res.nfev))}")
    print("phase   live rows   rounds   wall (s)   CPU (s)   ms per round (wall)")
    for phase, sel in (("stream", more), ("tail", ~more)):
        for lo, hi in ROW_CLASSES:
            s = sel & (rows > lo) & (rows <= hi)
            if s.any():
                label = f"({lo}, {hi}]" if hi < 10**9 else f"> {lo}"
                print(f"{phase:7s} {label:>11s} {int(s.sum()):8d} {dt[s].sum():10.3f} "
                      f"{dc[s].sum():9.3f} {1e3 * dt[s].mean():10.2f}")
    if args.stages:
        print(f"calling thread's CPU {thread_cpu:.2f} s, by stage:")
        for k, v in acc.most_common():
            print(f"  {k:38s} {v:7.3f} s  {100 * v / thread_cpu:5.1f} %")
        rest = thread_cpu - sum(acc.values())
        print(f"  {'loop bookkeeping (the rest)':38s} {rest:7.3f} s  "
              f"{100 * rest / thread_cpu:5.1f} %")


if __name__ == "__main__":
    main()
