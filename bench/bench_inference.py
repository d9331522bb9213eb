"""Whole-volume inference: the project's Gaussian sliding window against the reference code's scheme.

``core.inference.sliding_window`` (patch windows, overlap 0.5, Gaussian weights) vs
``core.inference.reference_windows`` (16-slice windows over the full in-plane extent, z-stride 2, softmax
summed), with the same model on the same volumes: time per volume (median, alternating), compute (voxels
passed through the network: proportional to FLOPs for a fully convolutional net) and mean foreground Dice.
The model is a small SepNet trained here on phantom cases (no trained study is needed); the compute ratio
at the paper's geometry (120x256x256 crop, patch 16x128x128) is also counted analytically from the window
rules, for several overlaps.

Run: ``.venv/bin/python bench/bench_inference.py [--quick]``.
"""

from __future__ import annotations

import time

import numpy as np
from _common import alternate, header, median, parser, set_threads, table, verdict


def _cases(n: int, *, size: str, seed0: int):
    from sepnet.core.intensity import apply_transform
    from sepnet.data.phantom import make_case

    out = []
    for i in range(n):
        c = make_case(seed=seed0 + i, size=size, case_id=f"c{i}")
        z, y, x = c.image.shape
        y8, x8 = y - y % 8, x - x % 8
        img = apply_transform(c.image[:, :y8, :x8], "SLF1").astype(np.float32)[None]
        out.append((img, c.label[:, :y8, :x8].astype(np.int64)))
    return out


def train_tiny(cases, *, iters: int, base: int, patch, seed: int = 0):
    """A small SepNet trained on random (half foreground-centred) patches of ``cases``; returns it in eval mode."""
    import torch

    from sepnet.core.networks import build

    try:
        from sepnet.core.losses import build_loss

        loss_fn = build_loss("exp_log")
    except ImportError:
        loss_fn = torch.nn.CrossEntropyLoss()
    model = build("sepnet", in_channels=1, num_classes=23, base=base, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(iters):
        xs, ys = [], []
        for _b in range(2):
            img, lab = cases[int(rng.integers(len(cases)))]
            shape = lab.shape
            if rng.random() < 0.5:
                fg = np.argwhere(lab > 0)
                c = fg[int(rng.integers(len(fg)))]
                st = [int(np.clip(ci - p // 2, 0, n - p)) for ci, p, n in zip(c, patch, shape)]
            else:
                st = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]
            sl = tuple(slice(s, s + p) for s, p in zip(st, patch))
            xs.append(img[(slice(None),) + sl])
            ys.append(lab[sl])
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys))
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def analytic(shape, patch, overlap):
    from sepnet.core.inference import window_starts

    n_sw = 1
    for s, p in zip(shape, patch):
        n_sw *= len(window_starts(s, p, overlap))
    sw = n_sw * int(np.prod(patch))
    z = shape[0]
    starts = list(range(0, z - 16 + 1, 2))
    if starts[-1] != z - 16:
        starts.append(z - 16)
    ref = len(starts) * 16 * shape[1] * shape[2]
    return n_sw, len(starts), ref / sw


def study_model(study):
    """Fold 0's first ensemble member of a trained study and that fold's test cases from its store."""
    import json
    from pathlib import Path

    from sepnet.data.store import Store
    from sepnet.jobs.models import find_models, load_trained

    root = Path(study)
    model = load_trained(find_models(root)[0][0])
    store = Store(root / "store")
    folds = json.loads((root / "folds.json").read_text())["folds"]
    test = [(store.read_image(c, model.channels), store.read_label(c).astype(np.int64)) for c in folds[0]["test"]]
    return model.network.eval(), test, tuple(model.spec.patch), f"{model.name} of {root}"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--study", help="use a trained study's fold-0 member and test cases (e.g. studies/quickstart)")
    args = p.parse_args()
    set_threads(args)
    import torch

    from sepnet.core.inference import reference_windows, sliding_window
    from sepnet.jobs.validation import mean_foreground, per_class_dice

    header("Inference: Gaussian sliding window vs the reference 16-slice scheme", args)
    reps = args.reps or (1 if args.quick else 3)
    iters = 3 if args.quick else 150
    base, patch = 4, (16, 32, 32)
    t0 = time.perf_counter()
    if args.study:
        model, test, patch, what = study_model(args.study)
        print(f"Model: {what} (patch {patch}); tested on its {len(test)} test cases of shape "
              f"{test[0][0].shape[1:]}; {reps} repetitions, alternating.\n")
    else:
        train = _cases(1 if args.quick else 4, size="tiny", seed0=0)
        test = _cases(1 if args.quick else 2, size="tiny", seed0=100)
        model = train_tiny(train, iters=iters, base=base, patch=patch)
        print(f"Model: SepNet base {base}, trained {iters} iterations (batch 2, patch {patch}) on {len(train)} "
              f"tiny phantom cases in {time.perf_counter() - t0:.0f} s; tested on {len(test)} other cases of "
              f"shape {test[0][0].shape[1:]}; {reps} repetitions, alternating.\n")
    plane = tuple(test[0][0].shape[2:])
    voxels = {"sw": 0, "ref": 0, "swp": 0}

    def predictor(key):
        def f(x):
            voxels[key] += int(np.prod(x.shape[2:])) * x.shape[0]
            return model(x)
        return f

    results = {}

    def run(key):
        def go():
            voxels[key] = 0
            dices = []
            with torch.inference_mode():
                for img, lab in test:
                    if key in ("sw", "swp"):
                        p = patch if key == "sw" else (patch[0],) + plane
                        probs = sliding_window(img, predictor(key), num_classes=23, patch=p, overlap=0.5,
                                               batch_size=2)
                    else:
                        probs = reference_windows(img, predictor(key), num_classes=23, depth=16, stride=2)
                    pred = probs.argmax(0).numpy()
                    dices.append(mean_foreground(per_class_dice(pred, lab, num_classes=23)))
            results[key] = (float(np.mean(dices)), voxels[key])
        return go

    times = alternate({"sw": run("sw"), "ref": run("ref"), "swp": run("swp")}, reps=reps, warmup=0)
    t_sw, t_ref, t_swp = median(times["sw"]), median(times["ref"]), median(times["swp"])
    (d_sw, v_sw), (d_ref, v_ref), (d_swp, v_swp) = results["sw"], results["ref"], results["swp"]
    table(["scheme", "s per volume (median)", "voxels through the net per volume", "mean fg Dice"], [
        [f"sliding_window (patch {patch}, overlap 0.5, Gaussian)", t_sw / len(test), v_sw / len(test), d_sw],
        ["reference_windows (16 slices, full plane, z-stride 2)", t_ref / len(test), v_ref / len(test), d_ref],
        [f"sliding_window (patch ({patch[0]}, {plane[0]}, {plane[1]}) = full plane, overlap 0.5, Gaussian)",
         t_swp / len(test), v_swp / len(test), d_swp],
    ])
    rows = []
    for pt, ov in (((16, 128, 128), 0.5), ((16, 128, 128), 0.33), ((16, 128, 128), 0.25), ((16, 128, 128), 0.0),
                   ((16, 256, 256), 0.5)):
        n_sw, n_ref, ratio = analytic((120, 256, 256), pt, ov)
        rows.append([f"{pt}, overlap {ov}", n_sw, n_ref, ratio])
    print("Compute at the paper's geometry (volume 120x256x256), counted from the window rules:\n")
    table(["sliding_window patch, overlap", "windows", "reference windows (16x256x256)", "reference / sliding voxels"],
          rows)
    ratio = v_ref / v_sw
    table(["target", "measured", "verdict"], [
        [">= 3x less compute (this run's geometry)", f"{ratio:.2f}x, Dice {d_sw:.3f} vs {d_ref:.3f}",
         verdict(ratio >= 3 and d_sw >= d_ref - 0.01)],
        [">= 3x less compute (paper geometry, overlap 0.5)", f"{rows[0][3]:.2f}x", verdict(rows[0][3] >= 3)],
        [">= 3x less compute, full-plane window (this run)", f"{v_ref / v_swp:.2f}x, Dice {d_swp:.3f} vs {d_ref:.3f}",
         verdict(v_ref / v_swp >= 3 and d_swp >= d_ref - 0.01)],
        [">= 3x less compute, full-plane window (paper geometry)", f"{rows[-1][3]:.2f}x", verdict(rows[-1][3] >= 3)],
    ])


if __name__ == "__main__":
    main()
