#!/bin/bash
# the fourteenth session's idle sample: the tree at /work/main against the start rev 6b5ac18
# usage: run.sh OUT_DIR   (the files in this folder are its outputs, renamed NAME.txt -> PREFIX_NAME.txt)
. /work/venv/bin/activate
cd /work/main
export PYTHONPATH=/work/main
O=${1:-/work/notes/idle14}
B=6b5ac18
mkdir -p $O
step() { name=$1; shift; echo "start $name $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> $O/progress.txt; "$@" > $O/$name.txt 2>&1; echo "end $name rc=$? $(date +%T)" >> $O/progress.txt; }
step ab_small python benchmarks/ab_small.py --before $B --repeat 31 --out-dir $O/ab_small
step sparse python benchmarks/bench_sparse.py --case ba --threads 2 --before $B --repeat 3 --out-dir $O/sparse
step ab_curve_fit python benchmarks/ab_curve_fit.py --before $B --threads 1 --out-dir $O/ab_curve_fit
step batch20k python benchmarks/bench_batch.py --batch 20000 --scipy-subset 500 --repeat 7 --interleave --variants "torch model, analytic jac" --no-scaling --no-chunk-sweep --methods lm trf --out-dir $O/batch20k
step tail_issue python benchmarks/bench_tail.py --before 13bfbc6 --B 2000 --repeat 2 --out-dir $O/tail_issue
step ops python benchmarks/bench_ops.py --only-b1 --out-dir $O/ops
step pixel python benchmarks/pixel_cost.py --threads 1 --before $B --rounds 7 --out-dir $O/pixel
step batch20k2 python benchmarks/bench_batch.py --batch 20000 --scipy-subset 500 --repeat 7 --interleave --variants "torch model, analytic jac" --no-scaling --no-chunk-sweep --methods lm --out-dir $O/batch20k2
step sparse2 python benchmarks/bench_sparse.py --case ba --threads 2 --before $B --repeat 3 --out-dir $O/sparse2
step ab_small2 python benchmarks/ab_small.py --before $B --repeat 31 --out-dir $O/ab_small2
echo ALLDONE >> $O/progress.txt
