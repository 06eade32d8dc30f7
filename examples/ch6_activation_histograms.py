"""Activation histograms of a 5-layer network (the book's section 6.2.2, figures 6-10..6-14).

1000 random inputs (standard normal, 100 features) go through 5 fully connected
layers of 100 nodes (no biases), for each weight scale (std 1, std 0.01, Xavier
sqrt(1/100), He sqrt(2/100)) and activation (sigmoid, tanh, ReLU).  All 12 runs use
the same input; the weights of each run are drawn afresh from xpnet's seeded source.

Measured per layer: the mean and standard deviation of the activations, the share
"saturated" (sigmoid output below 0.1 or above 0.9), the share "near 0.5"
(|a - 0.5| < 0.05) and, for ReLU, the share of exact zeros (left out of the ReLU
histograms, which would otherwise show little but the spike at 0).

Checks (sigmoid, every layer): std 1 piles the activations at 0 and 1 (over half
saturated); std 0.01 concentrates them at 0.5 (over 90 % near 0.5); Xavier keeps them
spread (under 10 % saturated and under 50 % near 0.5).  And (ReLU): He keeps the
spread of the activations from layer 1 to layer 5 while Xavier and std 0.01 let it
shrink (figure 6-14).

    python examples/ch6_activation_histograms.py --out docs/figures/ch6_activation_histograms
"""

from __future__ import annotations

import math

import _common
import numpy as np
from _common import plt

from xpnet.backend import get_rng, to_backend, to_cpu, xp
from xpnet.layers import ReLU, Sigmoid, Tanh

SCALES = {"std=1": lambda n: 1.0, "std=0.01": lambda n: 0.01,
          "Xavier": lambda n: math.sqrt(1.0 / n), "He": lambda n: math.sqrt(2.0 / n)}
ACTIVATIONS = {"sigmoid": Sigmoid, "tanh": Tanh, "ReLU": ReLU}
RANGES = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "ReLU": (0.0, 1.0)}


def forward(x, scale: str, activation: str, layers: int, nodes: int) -> list[np.ndarray]:
    """The host activations of each layer."""
    out = []
    a = x
    for _ in range(layers):
        w = get_rng().normal((a.shape[1], nodes), SCALES[scale](a.shape[1]), x.dtype)
        a = ACTIVATIONS[activation]().forward(a @ w, False)
        out.append(to_cpu(a).astype(np.float64))
    return out


def stats(a: np.ndarray) -> dict[str, float]:
    return {"mean": float(a.mean()), "std": float(a.std()),
            "saturated": float(np.mean((a < 0.1) | (a > 0.9))),
            "near_half": float(np.mean(np.abs(a - 0.5) < 0.05)),
            "zero": float(np.mean(a == 0))}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    samples = 200 if args.quick else 1000
    nodes, layers = 100, 5
    run = _common.Run(args, "ch6_activation_histograms", "Activation histograms",
                      book="6.2.2 (figures 6-10 to 6-14)",
                      settings={"input": f"standard normal ({samples}, {nodes})",
                                "layers": layers, "nodes": nodes, "bias": False,
                                "weight_scales": {"std=1": 1.0, "std=0.01": 0.01,
                                                  "Xavier": "sqrt(1/100) = 0.1",
                                                  "He": "sqrt(2/100) = 0.141"},
                                "activations": list(ACTIVATIONS),
                                "saturated": "a < 0.1 or a > 0.9",
                                "near_half": "|a - 0.5| < 0.05"})
    x = to_backend(run.rng.standard_normal((samples, nodes)).astype(np.float32))
    x = x.astype(xp.float32)

    acts: dict[str, dict[str, list[np.ndarray]]] = {}
    table: dict[str, dict[str, list[dict[str, float]]]] = {}
    combos = [(act, scale) for act in ACTIVATIONS for scale in SCALES]
    for act, scale in _common.progress(combos, desc="forward"):
        acts.setdefault(act, {})[scale] = layer_acts = forward(x, scale, act, layers, nodes)
        table.setdefault(act, {})[scale] = [stats(a) for a in layer_acts]
    run.results["per_layer"] = table

    for act in ACTIVATIONS:
        fig, axes = plt.subplots(len(SCALES), layers, figsize=(14, 9), sharex=True)
        for r, scale in enumerate(SCALES):
            for c, a in enumerate(acts[act][scale]):
                ax = axes[r, c]
                s = table[act][scale][c]
                values = a.ravel()
                title = f"{scale}, layer {c + 1}\nstd {s['std']:.3g}"
                if act == "ReLU":  # the zeros (about half) would dwarf the rest
                    values = values[values > 0]
                    title += f", {100 * s['zero']:.0f} % zeros"
                counts, edges = np.histogram(values, bins=30, range=RANGES[act])
                ax.stairs(counts, edges, fill=True, color="C0")
                ax.set_title(title)
                if c:
                    ax.set_yticks([])
        fig.suptitle(f"{act}: activation histograms of 5 layers x 100 nodes "
                     f"({samples} inputs), by weight scale"
                     + (" (zeros left out)" if act == "ReLU" else ""))
        fig.subplots_adjust(hspace=0.55, wspace=0.08, top=0.91)
        run.savefig(fig, f"histograms_{act.lower()}.png")

    sig = table["sigmoid"]

    def per_layer(scale: str, key: str) -> list[float]:
        return [round(s[key], 4) for s in sig[scale]]

    run.check("std1_sigmoid_saturates",
              "weights std 1 with sigmoid pile the activations at 0 and 1 (over half of "
              "them below 0.1 or above 0.9, in every layer)",
              min(s["saturated"] for s in sig["std=1"]) > 0.5,
              {"saturated_share_per_layer": per_layer("std=1", "saturated")})
    run.check("std001_sigmoid_at_half",
              "weights std 0.01 with sigmoid concentrate the activations at 0.5 (over 90 % "
              "within 0.05 of 0.5, in every layer)",
              min(s["near_half"] for s in sig["std=0.01"]) > 0.9,
              {"near_half_share_per_layer": per_layer("std=0.01", "near_half"),
               "std_per_layer": per_layer("std=0.01", "std")})
    run.check("xavier_sigmoid_spread",
              "Xavier weights with sigmoid keep the activations spread (under 10 % "
              "saturated and under 50 % within 0.05 of 0.5, in every layer)",
              max(s["saturated"] for s in sig["Xavier"]) < 0.1
              and max(s["near_half"] for s in sig["Xavier"]) < 0.5,
              {"saturated_share_per_layer": per_layer("Xavier", "saturated"),
               "near_half_share_per_layer": per_layer("Xavier", "near_half"),
               "std_per_layer": per_layer("Xavier", "std")})
    relu = table["ReLU"]
    ratio = {k: relu[k][-1]["std"] / relu[k][0]["std"] for k in ("std=0.01", "Xavier", "He")}
    run.check("he_relu_keeps_spread",
              "with ReLU, He keeps the spread from layer 1 to layer 5 (std ratio within "
              "0.5..2) while it shrinks with Xavier and with std 0.01 (ratio below He's)",
              0.5 <= ratio["He"] <= 2 and ratio["Xavier"] < ratio["He"]
              and ratio["std=0.01"] < ratio["He"],
              {f"{k}_std_layer5_over_layer1": v for k, v in ratio.items()})
    run.finish()


if __name__ == "__main__":
    main()
