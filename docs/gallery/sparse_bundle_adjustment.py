"""A small bundle adjustment: a sparse Jacobian from ``jac_sparsity``.

Cameras (rotation vector, translation, focal length, two radial distortion
coefficients: 9 parameters each) observe 3-D points; the residuals are the
reprojection errors, two per observation. Each residual depends on one
camera and one point only, so the Jacobian is sparse. ``jac_sparsity`` states
which entries can be nonzero: the finite differences then perturb groups of
columns that share no row (12 evaluations per Jacobian here instead of one
per parameter), the Jacobian stays sparse and ``tr_solver='lsmr'`` is chosen, as
in scipy's cookbook example. The same call with scipy is shown for
comparison. The left panel shows the structure of ``res.jac``, the right one
the cost after each iteration (from ``callback``).
"""

import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize
import scipy.sparse as sp

from torchimize_scipy import least_squares

n_cameras, n_points, per_point = 6, 120, 3
rng = np.random.default_rng(0)


def rotate(points, rot_vecs):
    """Rodrigues' rotation of each point by its rotation vector."""
    theta = np.linalg.norm(rot_vecs, axis=1)[:, None]
    with np.errstate(invalid="ignore"):
        v = np.nan_to_num(rot_vecs / theta)
    dot = np.sum(points * v, axis=1)[:, None]
    return (np.cos(theta) * points + np.sin(theta) * np.cross(v, points)
            + dot * (1 - np.cos(theta)) * v)


def project(points, cams):
    """Pinhole projection with radial distortion (the BAL camera model)."""
    p = rotate(points, cams[:, :3]) + cams[:, 3:6]
    p = -p[:, :2] / p[:, 2, None]
    n2 = np.sum(p**2, axis=1)
    return p * (cams[:, 6] * (1 + cams[:, 7] * n2 + cams[:, 8] * n2**2))[:, None]


# a synthetic scene: cameras around the points, 3 observations a point
cams = np.zeros((n_cameras, 9))
cams[:, :3] = 0.3 * rng.standard_normal((n_cameras, 3))
cams[:, 3:6] = [0.0, 0.0, -6.0] + 0.3 * rng.standard_normal((n_cameras, 3))
cams[:, 6] = 500.0
points = rng.uniform(-1, 1, (n_points, 3))
camera_idx = np.concatenate([rng.choice(n_cameras, per_point, replace=False)
                             for _ in range(n_points)])
point_idx = np.repeat(np.arange(n_points), per_point)
observed = project(points[point_idx], cams[camera_idx]) + rng.standard_normal(
    (point_idx.size, 2))


def residuals(params):
    c = params[:n_cameras * 9].reshape(n_cameras, 9)
    p = params[n_cameras * 9:].reshape(n_points, 3)
    return (project(p[point_idx], c[camera_idx]) - observed).ravel()


# which residual depends on which parameter
m, n = 2 * point_idx.size, 9 * n_cameras + 3 * n_points
obs = np.arange(point_idx.size)
rows = np.concatenate([np.repeat(2 * obs + r, 9) for r in (0, 1)]
                      + [np.repeat(2 * obs + r, 3) for r in (0, 1)])
cols = np.concatenate([(9 * camera_idx[:, None] + np.arange(9)).ravel()] * 2
                      + [(9 * n_cameras + 3 * point_idx[:, None] + np.arange(3)).ravel()] * 2)
sparsity = sp.csr_array((np.ones(rows.size, dtype=int), (rows, cols)), shape=(m, n))

x0 = np.concatenate([(cams + 0.01 * rng.standard_normal(cams.shape) * [1, 1, 1, 5, 5, 5, 0, 0,
                                                                         0]).ravel(),
                     (points + 0.03 * rng.standard_normal(points.shape)).ravel()])

costs = []
res = least_squares(residuals, x0, jac_sparsity=sparsity, x_scale="jac", ftol=1e-4,
                    callback=lambda intermediate_result: costs.append(intermediate_result.cost))
ref = scipy.optimize.least_squares(residuals, x0, jac_sparsity=sparsity, x_scale="jac",
                                   ftol=1e-4)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2))
ax0.spy(res.jac, markersize=0.5, aspect="auto")
ax0.set_title(f"structure of res.jac ({m} x {n}, {res.jac.nnz} nonzeros)")
ax0.set_xlabel("parameter (cameras, then points)")
ax0.set_ylabel("residual")
initial = 0.5 * np.sum(residuals(x0) ** 2)
ax1.semilogy(range(len(costs) + 1), [initial, *costs], "o-", label="torchimize_scipy")
ax1.axhline(ref.cost, color="k", ls="--", lw=1, label=f"scipy's final cost {ref.cost:.1f}")
ax1.set_xlabel("iteration")
ax1.set_ylabel("cost")
ax1.set_title(f"cost per iteration (final {res.cost:.1f}, {res.nfev} evaluations)")
ax1.legend()
fig.tight_layout()
