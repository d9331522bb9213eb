"""CPU bf16 autocast against float32: a training step and a sliding-window inference, SepNet and 3D-UNet.

Per network: forward + loss + backward + Adam step time in float32 and under ``torch.autocast("cpu",
bfloat16)`` (the path of ``training.cpu_bf16``), and whole-volume Gaussian sliding-window inference time in
both (``inference.cpu_bf16``), with the largest probability difference and the fraction of voxels whose
argmax label changes between the two, and the cosine similarity of one step's gradient (all parameters, and
the first convolution's) with the float64 gradient (random weights: numeric fidelity, not accuracy).
Median of alternating repetitions after one warm-up round. Only CPUs with bf16 instructions (avx512_bf16,
AMX) are expected to gain; the header prints whether this one has them.

A random-weight network is the worst case: ``--trained MODEL_DIR --store STORE`` adds the same gradient
and label comparison for a trained model (``jobs.models.load_trained``) on the patch at the centre of the
store's first case (the model's input channels). ``--study STUDY --study-models a,b`` decides the
inference default on trained models: each model's sliding-window labels (``jobs.models.TrainedModel.
probabilities``, the evaluation's path) on every fold-0 test case in float32 and in bf16, their time, and a
paired test of the per-case mean foreground Dice (``evaluation.significance.paired_test``).

Run: ``.venv/bin/python bench/bench_precision.py [--quick] [--base 8] [--patch 16,64,64] [--volume 60,128,128]
[--trained studies/claims/models/fold0/sep-slf1-a05 --store studies/claims/store]
[--study studies/claims --study-models sep-slf1-a05,unet3d]``.
"""

from __future__ import annotations

from _common import alternate, header, median, parser, set_threads, table, verdict


def _cpu_bf16_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return "unknown"
    have = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(have) or "none"


def _grad_cosines(name: str, *, base: int, x, y, loss_fn) -> dict[str, tuple[float, float]]:
    """precision -> (cosine of all gradients, cosine of the first conv's) with the float64 step's."""
    import torch

    from sepnet.core.inference import autocast
    from sepnet.core.networks import build

    grads = {}
    for prec, dtype in (("fp64", None), ("fp32", None), ("bf16", torch.bfloat16)):
        net = build(name, in_channels=1, num_classes=23, base=base, seed=0).eval()  # eval: no dropout
        xx = x.double() if prec == "fp64" else x
        if prec == "fp64":
            net = net.double()
        with autocast("cpu", dtype):
            out = net(xx)
        loss_fn(out if prec == "fp64" else out.float(), y).backward()
        params = [p.grad.flatten().double() for p in net.parameters()]
        grads[prec] = (torch.cat(params), params[0])

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    return {p: (cos(grads["fp64"][0], grads[p][0]), cos(grads["fp64"][1], grads[p][1])) for p in ("fp32", "bf16")}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="sepnet,unet3d")
    p.add_argument("--base", type=int, default=8)
    p.add_argument("--patch", default="16,64,64", help="training and inference window z,y,x")
    p.add_argument("--volume", default="60,128,128", help="inference volume z,y,x")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--trained", default=None, help="a trained model folder (spec.json, best.pt, done.json)")
    p.add_argument("--store", default=None, help="the store the --trained model was trained on")
    p.add_argument("--study", default=None, help="a trained study: bf16 vs fp32 inference Dice on its test cases")
    p.add_argument("--study-models", default="", help="models of --study (default: all of fold 0)")
    args = p.parse_args()
    if args.study:
        set_threads(args)
        header("CPU bf16 vs float32 inference on a trained study", args)
        _study_inference(args)
        return
    set_threads(args)
    import torch

    from sepnet.core.inference import autocast, sliding_window
    from sepnet.core.losses import build_loss
    from sepnet.core.networks import build

    header("CPU bf16 autocast vs float32", args)
    patch = (16, 16, 16) if args.quick else tuple(int(v) for v in args.patch.split(","))
    volume = (20, 32, 32) if args.quick else tuple(int(v) for v in args.volume.split(","))
    base = 4 if args.quick else args.base
    reps = args.reps or (2 if args.quick else 3)
    print(f"CPU bf16 instructions: {_cpu_bf16_flags()}. Training: batch {args.batch} x {patch}, base {base}, 23 "
          f"classes, ATH-L_Exp, Adam. Inference: volume {volume}, window {patch}, overlap 0.5, batch 2. "
          f"{reps} repetitions.\n")
    g = torch.Generator().manual_seed(0)
    x = torch.rand((args.batch, 1) + patch, generator=g)
    y = torch.randint(0, 23, (args.batch,) + patch, generator=g)
    vol = torch.rand((1,) + volume, generator=g)
    loss_fn = build_loss("ath_exp_log", alpha=0.5)
    items, nets = {}, {}
    for name in [m for m in args.models.split(",") if m]:
        for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            net = build(name, in_channels=1, num_classes=23, base=base, seed=0)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)

            def step(net=net, opt=opt, dtype=dtype):
                with autocast("cpu", dtype):
                    out = net(x)
                loss_fn(out.float(), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            items[f"{name} train {prec}"] = step
        net = build(name, in_channels=1, num_classes=23, base=base, seed=0).eval()
        nets[name] = net
        for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            def infer(net=net, dtype=dtype):
                def pred(b):
                    with torch.no_grad(), autocast("cpu", dtype):
                        return net(b).float()
                return sliding_window(vol, pred, num_classes=23, patch=patch, overlap=0.5, batch_size=2)

            items[f"{name} infer {prec}"] = infer
    times = alternate(items, reps=reps, warmup=1)
    rows, targets = [], []
    for name in nets:
        cosines = _grad_cosines(name, base=base, x=x, y=y, loss_fn=loss_fn)
        for what in ("train", "infer"):
            t32, t16 = median(times[f"{name} {what} fp32"]), median(times[f"{name} {what} bf16"])
            (a32, f32), (a16, f16) = cosines["fp32"], cosines["bf16"]
            drift = (f"gradient cosine vs fp64: fp32 {a32:.3f} (first conv {f32:.3f}), "
                     f"bf16 {a16:.3f} (first conv {f16:.3f})")
            if what == "train":
                targets.append([f"{name}: bf16 gradient cosine vs fp64 >= 0.9", f"{a16:.3f}", verdict(a16 >= 0.9)])
            if what == "infer":
                p32, p16 = items[f"{name} infer fp32"](), items[f"{name} infer bf16"]()
                changed = float((p32.argmax(0) != p16.argmax(0)).float().mean())
                drift = f"max |dp| {float((p32 - p16).abs().max()):.3f}, labels changed {100 * changed:.2f}%"
            rows.append([name, what, t32, t16, t32 / t16, drift])
            targets.append([f"{name} {what}: bf16 faster than fp32", f"{t32 / t16:.2f}x", verdict(t32 / t16 > 1.0)])
    table(["network", "step", "fp32 s (median)", "bf16 s (median)", "speed-up fp32/bf16", "numeric drift"], rows)
    table(["target", "measured", "verdict"], targets)
    if args.trained:
        _trained_fidelity(args, patch=patch, loss_fn=loss_fn)


def _trained_fidelity(args, *, patch, loss_fn) -> None:
    """Gradient cosine and label changes of bf16 vs float64 for a trained model on a real patch."""
    import copy

    import numpy as np
    import torch

    from sepnet.core.inference import autocast
    from sepnet.data.store import Store
    from sepnet.jobs.models import load_trained

    model = load_trained(args.trained)
    store = Store(args.store)
    cid = store.case_ids[0]
    img, lab = store.read_image(cid, list(model.channels)), store.read_label(cid)
    lo = [max(0, (n - p) // 2) for n, p in zip(img.shape[1:], patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
    x = torch.from_numpy(np.ascontiguousarray(img[(slice(None),) + sl], dtype=np.float32))[None]
    y = torch.from_numpy(model.spec.subset.to_subset(lab[sl]).astype(np.int64))[None]
    k = model.spec.num_classes
    out = {}
    for prec, dtype in (("fp64", None), ("bf16", torch.bfloat16)):
        net = copy.deepcopy(model.network).eval()
        xx = x
        if prec == "fp64":
            net, xx = net.double(), x.double()
        with autocast("cpu", dtype):
            logits = net(xx)
        loss_fn(logits.double() if prec == "fp64" else logits.float(), y,
                annotated=torch.ones(1, k, dtype=torch.bool)).backward()
        out[prec] = (torch.cat([p.grad.flatten().double() for p in net.parameters()]), logits.double().argmax(1))
    cos = float(torch.nn.functional.cosine_similarity(out["fp64"][0], out["bf16"][0], dim=0))
    changed = float((out["fp64"][1] != out["bf16"][1]).double().mean())
    table(["trained model", "case", "patch", "bf16 gradient cosine vs fp64", "labels changed"],
          [[model.name, cid, "x".join(map(str, patch)), f"{cos:.4f}", f"{100 * changed:.3f}%"]])


def _study_inference(args) -> None:
    """Per model of ``args.study`` fold 0: time and mean foreground Dice per test case, fp32 vs bf16."""
    import json
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from sepnet.data.store import Store
    from sepnet.evaluation.significance import paired_test
    from sepnet.jobs.config import InferenceConfig
    from sepnet.jobs.models import find_models, load_trained
    from sepnet.jobs.validation import mean_foreground, per_class_dice

    root = Path(args.study)
    store = Store(root / "store")
    test = json.loads((root / "folds.json").read_text())["folds"][0]["test"]
    wanted = [m for m in args.study_models.split(",") if m]
    dirs = [d for d in find_models(root)[0] if not wanted or d.name in wanted]
    print(f"Study {root}: fold 0, {len(test)} test cases; training-patch windows, overlap 0.5, batch 2; "
          "paired test of the per-case mean foreground Dice (bf16 - fp32), minimum effect 1 point.\n")
    rows = []
    for d in dirs:
        model = load_trained(d)
        dice: dict[str, list[float]] = {"fp32": [], "bf16": []}
        secs: dict[str, list[float]] = {"fp32": [], "bf16": []}
        changed = []
        for cid in test:
            img = store.read_image(cid, list(model.channels))
            ref = model.spec.subset.to_subset(store.read_label(cid))
            labels = {}
            for prec in ("fp32", "bf16"):
                inf = InferenceConfig(batch_size=2, cpu_bf16=prec == "bf16")
                t0 = time.perf_counter()
                labels[prec] = model.probabilities(img, inference=inf, device=torch.device("cpu")).argmax(0).numpy()
                secs[prec].append(time.perf_counter() - t0)
                k = model.spec.num_classes
                dice[prec].append(mean_foreground(per_class_dice(labels[prec], ref, num_classes=k)))
            changed.append(float((labels["fp32"] != labels["bf16"]).mean()))
        t = paired_test(dice["bf16"], dice["fp32"], min_effect=0.01)
        rows.append([model.name, f"{median(secs['fp32']):.1f}", f"{median(secs['bf16']):.1f}",
                     f"{median(secs['fp32']) / median(secs['bf16']):.2f}x", f"{np.mean(dice['fp32']):.4f}",
                     f"{np.mean(dice['bf16']):.4f}", t.describe(), t.status, f"{100 * np.mean(changed):.3f}%"])
    table(["model", "fp32 s/volume", "bf16 s/volume", "speed-up", "fp32 mean fg Dice", "bf16 mean fg Dice",
           "bf16 - fp32 (paired)", "verdict", "labels changed"], rows)


if __name__ == "__main__":
    main()
