"""Optimizer paths on f(x, y) = x^2/20 + y^2 (the book's section 6.1.7, figure 6-8).

Each optimizer starts at (-7, 2) and takes 30 steps with the book's learning rates
(SGD 0.95, Momentum 0.1, AdaGrad 1.5, Adam 0.3) plus RMSprop and Nesterov, which the
book does not plot (their learning rates are our choice, stated in summary.json).
The optimizers are xpnet's own, updating arrays on the active backend.

Reported: the paths on the contour plot, the distance to the minimum (0, 0) after
the 30 steps, and how often each path reverses its direction in y (SGD's zig-zag;
every sign change of the y step counts, however small the step).

    python examples/ch6_optimizer_paths.py --out docs/figures/ch6_optimizer_paths
"""

from __future__ import annotations

import _common
import numpy as np
from _common import plt

from xpnet.backend import to_cpu, xp
from xpnet.optim import get_optimizer

START = (-7.0, 2.0)
STEPS = 30
# name -> (optimizer, learning rate); the first four are the book's figure 6-8
SETTINGS = {
    "SGD": ("sgd", 0.95),
    "Momentum": ("momentum", 0.1),
    "AdaGrad": ("adagrad", 1.5),
    "Adam": ("adam", 0.3),
    "RMSprop": ("rmsprop", 0.3),
    "Nesterov": ("nesterov", 0.1),
}
BOOK = ("SGD", "Momentum", "AdaGrad", "Adam")


def f(x, y):
    return x ** 2 / 20.0 + y ** 2


def grad(params):
    return {"x": params["x"] / 10.0, "y": 2.0 * params["y"]}


def run_path(name: str, steps: int) -> np.ndarray:
    """The (steps + 1, 2) path of optimizer ``name`` from START."""
    opt_name, lr = SETTINGS[name]
    optimizer = get_optimizer(opt_name, lr=lr)
    params = {"x": xp.array([START[0]], dtype=xp.float64),
              "y": xp.array([START[1]], dtype=xp.float64)}
    path = [START]
    for _ in range(steps):
        optimizer.update(params, grad(params))
        path.append((float(to_cpu(params["x"])[0]), float(to_cpu(params["y"])[0])))
    return np.array(path)


def y_reversals(path: np.ndarray) -> int:
    """How often consecutive steps move in opposite y directions."""
    dy = np.diff(path[:, 1])
    signs = np.sign(dy[dy != 0])
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    steps = 10 if args.quick else STEPS
    run = _common.Run(args, "ch6_optimizer_paths", "Optimizer paths on x^2/20 + y^2",
                      book="6.1.7 (figure 6-8)",
                      settings={"function": "f(x, y) = x^2/20 + y^2", "start": list(START),
                                "steps": steps,
                                "learning_rates": {k: v[1] for k, v in SETTINGS.items()},
                                "momentum": 0.9, "rmsprop_decay_rate": 0.99,
                                "adam_betas": [0.9, 0.999],
                                "not_in_book": ["RMSprop", "Nesterov"]})

    paths = {name: run_path(name, steps) for name in _common.progress(SETTINGS, desc="paths")}

    table = {}
    for name, path in paths.items():
        x, y = path[-1]
        table[name] = {"final_x": x, "final_y": y, "final_f": f(x, y),
                       "distance_to_minimum": float(np.hypot(x, y)),
                       "y_reversals": y_reversals(path), "steps": steps,
                       "path": path.tolist()}
    run.results["optimizers"] = table

    # ---- figure: paths on the contour plot, the book's layout (+ two panels)
    gx = np.arange(-10, 10, 0.05)
    gy = np.arange(-5, 5, 0.05)
    X, Y = np.meshgrid(gx, gy)
    Z = f(X, Y)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (name, path) in zip(axes.ravel(), paths.items(), strict=True):
        ax.contour(X, Y, Z, levels=[0.05, 0.25, 0.5, 1, 2, 3, 4, 5, 6, 7], colors="0.6",
                   linewidths=0.7)
        ax.plot(path[:, 0], path[:, 1], "o-", color="red", markersize=3, linewidth=1)
        ax.plot(0, 0, "+", color="black", markersize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-5, 5)
        lr = SETTINGS[name][1]
        r = table[name]
        ax.set_title(f"{name} (lr={lr})\ndistance to minimum {r['distance_to_minimum']:.3g}, "
                     f"{r['y_reversals']} y-reversals")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    fig.suptitle(f"{steps} steps from {START} on f(x, y) = x\u00b2/20 + y\u00b2")
    fig.tight_layout()
    run.savefig(fig, "optimizer_paths.png")

    # ---- checks
    rev = {k: table[k]["y_reversals"] for k in BOOK}
    dist = {k: table[k]["distance_to_minimum"] for k in BOOK}
    possible = steps - 1
    run.check("sgd_zigzag",
              "SGD zig-zags: its path reverses direction in y at (nearly) every step "
              "(at least 90 % of the possible reversals)",
              rev["SGD"] >= 0.9 * possible,
              {"sgd_y_reversals": rev["SGD"], "possible": possible})
    run.check("sgd_most_reversals",
              "SGD reverses direction in y more often than Momentum, AdaGrad and Adam",
              all(rev["SGD"] > rev[k] for k in BOOK[1:]),
              {f"{k}_y_reversals": v for k, v in rev.items()})
    run.check("adagrad_best",
              "AdaGrad looks best on this function: it ends closest to the minimum of "
              "the four",
              all(dist["AdaGrad"] < dist[k] for k in BOOK if k != "AdaGrad"),
              {f"{k}_distance": v for k, v in dist.items()})
    run.check("sgd_farthest",
              "SGD, crawling along the flat x direction while it zig-zags in y, ends "
              "farther from the minimum than Momentum, AdaGrad and Adam",
              all(dist["SGD"] > dist[k] for k in BOOK[1:]),
              {f"{k}_distance": v for k, v in dist.items()},
              note="our reading of the book's 'inefficient path', not a sentence of "
                   "the book")
    run.finish()


if __name__ == "__main__":
    main()
