"""Probe: batches whose rows take the SVD route (ill-conditioned, tall), each row against scipy."""
import sys, tempfile, warnings, numpy as np, scipy.optimize as so
sys.path.insert(0, "/work/main/benchmarks")
warnings.simplefilter("ignore")
from torchimize_scipy import batch_least_squares
lib = {"new": batch_least_squares}
if len(sys.argv) > 1:
    from ab_small import import_commit
    lib["old"] = import_commit(sys.argv[1], tempfile.mkdtemp()).batch_least_squares
rng = np.random.default_rng(7)
t = np.linspace(0, 4, 60)
def model(p, t): return p[..., 0:1] * np.exp(-p[..., 1:2] * t) + p[..., 2:3] * np.exp(-p[..., 3:4] * t) + p[..., 4:5]
def res(p, y): return model(p, t) - y
def jac(p, y):
    e1, e2 = np.exp(-p[..., 1:2] * t), np.exp(-p[..., 3:4] * t)
    one = np.ones_like(e1)
    return np.stack([e1, -p[..., 0:1] * t * e1, e2, -p[..., 2:3] * t * e2, one], -1)
B = 300
true = np.stack([1 + rng.random(B), 0.5 + rng.random(B), 1 + rng.random(B), 0.6 + rng.random(B), 0.1 * rng.random(B)], 1)
y = model(true, t) + 0.01 * rng.normal(size=(B, t.size))
p0 = true * (1 + 0.3 * rng.normal(size=true.shape))
cases = [("trf", {}), ("lm", {}), ("dogbox", {}), ("trf", {"bounds": (0, 10)}), ("trf", {"loss": "soft_l1"}),
         ("trf", {"x_scale": "jac"})]
for method, kw in cases:
    sc = np.array([so.least_squares(lambda p, i=i: res(p, y[i]), p0[i], jac=lambda p, i=i: jac(p, y[i]),
                                    method=method, **kw).cost for i in range(B)])
    line = f"{method:6s} {str(kw):22s}"
    for name, f in lib.items():
        r = f(res, p0, jac=jac, args=(y,), method=method, **kw)
        c = np.asarray(r.cost)
        worse = (c > sc * (1 + 1e-6) + 1e-12).sum(); better = (c < sc * (1 - 1e-6) - 1e-12).sum()
        line += f" | {name}: worse {worse:3d} better {better:3d} nan {np.isnan(c).sum()}"
    print(line, flush=True)
