"""NIC: captions for digit canvases (the book's section 8.5.3, figure 8-21).

Neural Image Caption (NIC, Vinyals et al. 2015): a CNN encodes the image, and an LSTM,
started from that encoding, generates the sentence word by word.  The images are 64x64
canvases of 1 to 4 MNIST digits (``xpnet.datasets.load_digit_canvases``); the caption
names the digits from left to right ("three one four").  The model
(``examples/_captioning_model.py``)::

    canvas 64x64 -> [conv 3x3 - BatchNorm - ReLU - max pool 2x2] x 5 (16, 32, 64, 64, 128
           filters) -> flattened 2x2x128 feature -> Affine -> (h0, c0) of the LSTM
    <start> w1 w2 ... -> Embedding(32) -> LSTM(256) -> TimeAffine(13 words) -> softmax

Training: 12 epochs of 60000 canvases, teacher forcing (the true previous word is the
input at every step), cross-entropy of every next token up to ``<end>`` (padding
ignored), Adam with a cosine learning rate; the image's gradient reaches the encoder
through the LSTM's dh0 and dc0.
Generation: greedy, from ``<start>``, each step's most likely word fed back
(``LSTM.step``) until ``<end>``.

Data: training canvases and validation canvases are disjoint parts of the ``train``
split (MNIST's training digits); the settings were chosen on the validation canvases
(``--tune`` runs, which do not load the test canvases at all): the initial cell state
from the image as well as h0, no fully-connected layer between the feature map and the
state, the five-stage encoder (three-epoch runs of 40000 canvases: 0.555 exact with four
stages of 8-64 filters, 0.648 with 16-64, 0.666 with five stages of 16-128, 0.434 and
0.488 with three stages, whose finer map the Affine learns from more slowly), lr 1e-3
(3e-3 learned slower). Each epoch draws fresh training canvases (new layouts and digit
combinations of the same MNIST training digits): with one fixed set of 60000, eight
epochs brought the training loss to 0.056 per token but the validation canvases only to
0.843 exact (three-epoch runs of 40000: 0.7005 with fresh canvases, 0.666 with one set);
``--canvases-per-epoch same`` is that setting (its full run was also tested, before the
change: 0.8546 exact; the change was chosen from the validation gap, not from that
number). Wrong captions are almost all wrong digits, rarely the right digits in the
wrong order (``same_digits_acc``). The test canvases (the ``test`` split: MNIST's test
digits, never seen in training) are read once, for the final numbers.

Reported on the test canvases: exact-caption accuracy (every word and the length right),
per-word accuracy (a caption's i-th word right, over all true words), length accuracy.
Figures: test canvases with their generated and true captions; the first wrongly
captioned test canvases; the training loss and validation accuracies per epoch.

Checks: exact-caption accuracy >= 0.90; greedy decoding ends (emits ``<end>`` within
``max_digits + 1`` tokens) on at least 99 % of test canvases.  ``--quick`` trains 600
canvases for 1 epoch.

    XPNET_NUM_THREADS=1 python examples/ch8_captioning.py --out docs/figures/ch8_captioning
"""

from __future__ import annotations

import time
from typing import Any

import _common
import numpy as np
from _captioning_model import CaptionModel, conv_encoder
from _common import plt

from xpnet.backend import to_backend, to_cpu
from xpnet.datasets import VOCAB, decode_caption, load_digit_canvases
from xpnet.datasets.canvas import END_ID
from xpnet.optim import Adam, CosineLR

TARGET = 0.90
MAX_DIGITS = 4


# --------------------------------------------------------------------- data
def canvas_splits(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, dict]:
    """train and val: disjoint canvases of the train split; test: the test split (None
    when ``n_test`` is 0)."""
    both = load_digit_canvases("train", n=n_train + n_val, max_digits=MAX_DIGITS, seed=seed)
    test = load_digit_canvases("test", n=n_test, max_digits=MAX_DIGITS,
                               seed=seed) if n_test else None
    return {"train": {k: v[:n_train] for k, v in both.items()},
            "val": {k: v[n_train:] for k, v in both.items()}, "test": test}


def fresh_training_canvases(n: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s training canvases (images, tokens): from MNIST's training digits,
    with a seed of their own (never a run's base seed, so never the validation canvases)."""
    fresh = load_digit_canvases("train", n=n, max_digits=MAX_DIGITS,
                                seed=1_000_000 + 1000 * seed + epoch, cache=False)
    return fresh["images"], fresh["tokens"]


# --------------------------------------------------------------------- evaluation
def generate(model: CaptionModel, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """Greedy token ids (N, MAX_DIGITS + 1) of host images, batch by batch, on the host."""
    out = [to_cpu(model.generate(to_backend(images[i:i + batch]), MAX_DIGITS))
           for i in range(0, len(images), batch)]
    return np.concatenate(out)


def caption_metrics(pred: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    """Accuracies of generated ids ``pred`` (N, L) against true ``tokens`` (N, L + 1).

    The truth is ``tokens[:, 1:]`` (words, ``<end>``, padding), aligned with ``pred``.
    exact: the whole row equal (all words, the length and ``<end>``); word: the i-th word
    right, over every true word; length: as many words as the truth, then ``<end>``;
    same_digits: the true digits in any order (exact but for the order).
    """
    truth = tokens[:, 1:]
    words = truth >= 3
    n_true = words.sum(axis=1)
    ended = (pred == END_ID).any(axis=1)
    n_pred = np.where(ended, (pred == END_ID).argmax(axis=1), pred.shape[1])
    exact = (pred == truth).all(axis=1)
    # the same digits in some order: what is left of exact's errors is ordering
    same_digits = np.array([sorted(p[:k]) == sorted(t[:m]) and e for p, t, k, m, e in
                            zip(pred.tolist(), truth.tolist(), n_pred.tolist(),
                                n_true.tolist(), ended.tolist(), strict=True)])
    per_count = {}
    for k in range(1, MAX_DIGITS + 1):
        sel = n_true == k
        if sel.any():
            per_count[str(k)] = {"canvases": int(sel.sum()),
                                 "exact_caption_acc": float(exact[sel].mean())}
    return {"canvases": int(len(pred)),
            "exact_caption_acc": float(exact.mean()),
            "word_acc": float((pred == truth)[words].mean()),
            "length_acc": float((ended & (n_pred == n_true)).mean()),
            "same_digits_acc": float(same_digits.mean()),
            "ended": float(ended.mean()),
            "per_digit_count": per_count,
            "exact": exact}


# --------------------------------------------------------------------- figures
def caption_grid(run: _common.Run, data: dict, pred: np.ndarray, index: np.ndarray,
                 filename: str, title: str, cols: int = 6) -> None:
    """Canvases with the generated caption (green: exact, red: not) and the truth."""
    rows = max(1, -(-len(index) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.75 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        if k >= len(index):
            ax.axis("off")
            continue
        i = int(index[k])
        gen, true = decode_caption(pred[i]), str(data["captions"][i])
        ok = gen == true and (pred[i] == END_ID).any()
        ax.imshow(data["images"][i, 0], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{gen or '(nothing)'}", fontsize=8, color="tab:green" if ok else "tab:red")
        ax.set_xlabel(f"true: {true}", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    run.savefig(fig, filename)


def curves(run: _common.Run, losses: np.ndarray, steps_per_epoch: int,
           val_history: list[dict], test: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    it = np.arange(1, len(losses) + 1) / steps_per_epoch
    axes[0].plot(it, losses, color="0.75", linewidth=0.5, label="per step")
    axes[0].plot(it, _common.smooth(losses, 101), label="smoothed")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epochs")
    axes[0].set_ylabel("training loss (per token)")
    axes[0].legend()
    ep = np.arange(1, len(val_history) + 1)
    for key, label, marker in (("exact_caption_acc", "exact caption", "o"),
                               ("word_acc", "per word", "s"), ("length_acc", "length", "^")):
        axes[1].plot(ep, [h[key] for h in val_history], marker=marker, label=label)
    axes[1].set_xlabel("epochs")
    axes[1].set_ylabel("validation accuracy (greedy captions)")
    axes[1].set_ylim(0, 1.0)
    axes[1].legend(loc="lower right")
    counts = sorted(test["per_digit_count"], key=int)
    acc = [test["per_digit_count"][c]["exact_caption_acc"] for c in counts]
    bars = axes[2].bar(counts, acc, color="tab:blue")
    axes[2].bar_label(bars, labels=[f"{a:.3f}" for a in acc], fontsize=8)
    axes[2].axhline(TARGET, color="tab:red", linestyle="--", linewidth=1,
                    label=f"target {TARGET:.2f} (all)")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xlabel("digits on the canvas")
    axes[2].set_ylabel("test exact-caption accuracy")
    axes[2].set_title(f"test: exact {test['exact_caption_acc']:.4f}, "
                      f"per word {test['word_acc']:.4f}")
    axes[2].legend(loc="lower left")
    fig.tight_layout()
    run.savefig(fig, "training_curves.png")


# --------------------------------------------------------------------- main
def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=None,
                   help="training canvases (default 60000; quick 600)")
    p.add_argument("--val", type=int, default=None,
                   help="validation canvases, from the train split (default 2000; quick 200)")
    p.add_argument("--test", type=int, default=None,
                   help="test canvases, from the test split (default 5000; quick 200)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 12; quick 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate")
    p.add_argument("--channels", default="16,32,64,64,128",
                   help="filters of the encoder's convolutions, one per 2x2 pooling")
    p.add_argument("--feature", type=int, default=None,
                   help="an Affine + ReLU of this size after the flattened feature map "
                        "(default: none, the map itself is the feature)")
    p.add_argument("--hidden", type=int, default=256, help="the LSTM's hidden size")
    p.add_argument("--embed", type=int, default=32, help="word embedding size")
    p.add_argument("--no-batch-norm", action="store_true",
                   help="no BatchNormalization in the encoder")
    p.add_argument("--canvases-per-epoch", choices=("fresh", "same"), default="fresh",
                   help="fresh: new training canvases every epoch (new layouts and digit "
                        "combinations from the same MNIST training digits); same: one set "
                        "for all epochs")
    p.add_argument("--save-params", action="store_true",
                   help="write the trained parameters and buffers to captioning_params.npz")
    p.add_argument("--tune", action="store_true",
                   help="choosing settings: train and report the validation canvases only "
                        "(the test canvases are not even loaded)")
    args = p.parse_args()
    quick = args.quick
    n_train = args.train or (600 if quick else 60000)
    n_val = args.val or (200 if quick else 2000)
    n_test = args.test or (200 if quick else 5000)
    epochs = args.epochs or (1 if quick else 12)
    channels = tuple(int(c) for c in args.channels.split(","))
    batch_norm = not args.no_batch_norm
    fc = f", Affine {args.feature}, ReLU" if args.feature else ""
    run = _common.Run(args, "ch8_captioning", "NIC: captioning digit canvases",
                      book="8.5.3 (figure 8-21)",
                      settings={"model": f"CNN encoder (3x3 conv {channels}, "
                                         f"{'BatchNorm, ' if batch_norm else ''}ReLU, max pool "
                                         f"2x2 each; flattened{fc}) -> Affine -> LSTM initial "
                                         f"state (h0, c0); Embedding {args.embed} -> LSTM "
                                         f"{args.hidden} -> TimeAffine {len(VOCAB)}",
                                "train_canvases": n_train, "val_canvases": n_val,
                                "test_canvases": n_test, "max_digits": MAX_DIGITS,
                                "epochs": epochs, "batch_size": args.batch_size,
                                "canvases_per_epoch": args.canvases_per_epoch,
                                "optimizer": f"Adam, cosine lr from {args.lr} to 0, "
                                             "warm-up 1 % of the steps",
                                "decoding": "greedy, until <end> or "
                                            f"{MAX_DIGITS + 1} tokens",
                                "selection": "settings chosen on the validation canvases; "
                                             "the last epoch's model is tested"})

    t0 = time.perf_counter()
    data = canvas_splits(n_train, n_val, 0 if args.tune else n_test, run.seed)
    run.results["data_seconds"] = time.perf_counter() - t0
    train, val, test = data["train"], data["val"], data["test"]

    encoder, feature = conv_encoder(channels, train["images"].shape[-1], args.feature,
                                    batch_norm=batch_norm)
    model = CaptionModel(encoder, feature, len(VOCAB), args.embed, args.hidden)
    run.settings["parameters"] = model.num_params
    steps_per_epoch = -(-n_train // args.batch_size)
    total = epochs * steps_per_epoch
    opt = Adam(lr=args.lr)
    sched = CosineLR(opt, total_steps=total, warmup_steps=max(1, total // 100))

    losses, val_history, epoch_seconds = [], [], []
    images, tokens = train["images"], train["tokens"]
    bar = _common.progress(total=total, desc="steps")
    t_train = time.perf_counter()
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        if epoch and args.canvases_per_epoch == "fresh":
            images, tokens = fresh_training_canvases(n_train, run.seed, epoch)
        order = run.rng.permutation(n_train)
        for start in range(0, n_train, args.batch_size):
            idx = order[start:start + args.batch_size]
            grads = model.gradient(to_backend(images[idx]), to_backend(tokens[idx]))
            opt.update(model.params, grads)
            sched.step()
            losses.append(model.last_loss)
            bar.update(1)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        m = caption_metrics(generate(model, val["images"]), val["tokens"])
        m.pop("exact")
        val_history.append(m)
        bar.set_postfix(val_exact=f"{m['exact_caption_acc']:.3f}",
                        val_word=f"{m['word_acc']:.3f}", refresh=False)
        epoch_loss = float(_common.host_floats(losses[-steps_per_epoch:]).mean())
        print(f"  epoch {epoch + 1}/{epochs}: loss {epoch_loss:.4f}, validation exact "
              f"{m['exact_caption_acc']:.4f}, per word {m['word_acc']:.4f}, same digits "
              f"{m['same_digits_acc']:.4f}, length {m['length_acc']:.4f} "
              f"({epoch_seconds[-1]:.0f} s)", flush=True)
    bar.close()
    train_seconds = time.perf_counter() - t_train
    losses = _common.host_floats(losses)

    if args.save_params:
        np.savez(run.out / "captioning_params.npz",
                 **{k: to_cpu(v) for k, v in {**model.params, **model.buffers}.items()})
    if args.tune:
        run.results.update(validation=val_history[-1], validation_per_epoch=val_history,
                           train_seconds=train_seconds, epoch_seconds=epoch_seconds,
                           final_train_loss=_common.tail_mean(losses, steps_per_epoch))
        run.notes.append("--tune: validation canvases only, no test numbers and no checks")
        run.finish()
        return

    # ---- the test canvases, once
    t0 = time.perf_counter()
    pred = generate(model, test["images"])
    test_seconds = time.perf_counter() - t0
    res = caption_metrics(pred, test["tokens"])
    exact = res.pop("exact")
    first = min(20, n_test)
    run.results.update(
        test=res, validation=val_history[-1], validation_per_epoch=val_history,
        final_train_loss=_common.tail_mean(losses, steps_per_epoch),
        train_seconds=train_seconds, epoch_seconds=epoch_seconds,
        test_generation_seconds=test_seconds,
        examples=[{"index": i, "generated": decode_caption(pred[i]),
                   "true": str(test["captions"][i]), "exact": bool(exact[i])}
                  for i in range(first)])

    caption_grid(run, test, pred, np.arange(min(24, n_test)), "captions.png",
                 f"generated captions of the first test canvases (green: exact; below: the "
                 f"truth); test exact-caption accuracy {res['exact_caption_acc']:.4f}")
    wrong = np.flatnonzero(~exact)[:12]
    caption_grid(run, test, pred, wrong, "caption_errors.png",
                 f"the first {len(wrong)} of {int((~exact).sum())} wrongly captioned test "
                 f"canvases ({n_test})")
    curves(run, losses, steps_per_epoch, val_history, res)

    shortened = quick or n_train < 60000 or epochs < 12
    run.check("exact_caption_accuracy",
              f"NIC (CNN encoder + LSTM decoder, greedy) captions at least {TARGET:.0%} of "
              "held-out test canvases exactly",
              res["exact_caption_acc"] >= TARGET,
              {"exact_caption_acc": res["exact_caption_acc"], "word_acc": res["word_acc"],
               "length_acc": res["length_acc"], "test_canvases": n_test},
              note="a shortened run (--quick / fewer canvases or epochs) is not the "
                   "full setting" if shortened else None)
    run.check("decoding_ends",
              "greedy decoding emits <end> within max_digits + 1 tokens on at least 99 % "
              "of test canvases",
              res["ended"] >= 0.99, {"ended": res["ended"], "test_canvases": n_test})
    run.finish()


if __name__ == "__main__":
    main()
