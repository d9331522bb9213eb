"""Training step of 3D-SepNet against the 3D U-Net baselines at the paper's patch and batch.

Per model (base 24, 1 input channel, 23 classes, patch 16x128x128, batch 2; ``--quick``: base 4, 16x32x32):
forward + cross-entropy + backward + Adam step time (median of alternating repetitions), parameters,
FLOPs of forward + backward (``torch.utils.flop_counter.FlopCounterMode``), achieved FLOP/s as a fraction
of a 2048x2048 float32 matmul measured in the same alternation, and peak resident memory of one step
(``resource.getrusage`` max RSS in a fresh subprocess per model, minus the RSS after building the model).
SepNet's conv2d fast path (opt-in: build(..., fast=True)) is compared with the same weights as plain ``nn.Conv3d``
(``to_plain_conv3d``), outputs checked equal to float tolerance. GPU figures (AMP) where CUDA exists.

Run: ``.venv/bin/python bench/bench_models.py [--quick]``; the paper-size memory table: ``bench/bench_models.py
--memory-only --base 24 --patch 16,128,128 --models sepnet+plain,sepnet+plain+ckpt,unet3d+plain``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from _common import alternate, cuda_note, header, median, parser, set_threads, table, verdict

MODELS = ("sepnet", "sepnet_se", "unet3d", "unet3d_res", "unet3d_se")


def _cfg(args):
    """quick: tiny. Full default: base 12 at 16x64x64 (a paper-size step, base 24 at 16x128x128, takes ~100 s
    for SepNet and ~190 s for the 3D U-Net on 1 shared core; pass --base 24 --patch 16,128,128 for it)."""
    if args.quick:
        return dict(base=4, patch=(16, 16, 16), batch=2)
    return dict(base=args.base, patch=tuple(int(v) for v in args.patch.split(",")), batch=args.batch)


def _step_fn(model, x, y, opt, *, amp=False):
    import torch

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def _setup(name, cfg, device="cpu", plain=False, ckpt=False):
    import torch

    from sepnet.core.networks import build, set_checkpointing, to_plain_conv3d

    model = build(name, in_channels=1, num_classes=23, base=cfg["base"], seed=0, fast=not plain)
    if plain:
        model = to_plain_conv3d(model)
    set_checkpointing(model, ckpt)
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((cfg["batch"], 1) + cfg["patch"], generator=g).to(device)
    y = torch.randint(0, 23, (cfg["batch"],) + cfg["patch"], generator=g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, x, y, opt


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, args) -> None:
    """Subprocess: RSS after building, peak RSS over two training steps (MiB) and the second step's
    seconds, printed as JSON. ``name`` + "+plain": plain Conv3d (the training default); + "+ckpt":
    checkpointed blocks (both may be given)."""
    import time

    import torch

    torch.set_num_threads(args.threads)
    cfg = _cfg(args)
    base, *flags = name.split("+")
    model, x, y, opt = _setup(base, cfg, plain="plain" in flags, ckpt="ckpt" in flags)
    before = _rss_mib()
    step = _step_fn(model, x, y, opt)
    step()  # Adam's state is allocated in the first step
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before": before, "peak": peak, "seconds": seconds}))


def memory_table(args) -> None:
    """``--memory-only``: one subprocess per model (names may end in +ckpt or +plain): peak RSS and the
    step time, against the plain 3D U-Net's."""
    cfg = _cfg(args)
    print(f"Input (B, C, Z, Y, X) = ({cfg['batch']}, 1, {', '.join(map(str, cfg['patch']))}), base {cfg['base']}, "
          "23 classes, Adam; one subprocess per model, two steps, the second timed.\n")
    res = {}
    for n in [m for m in args.models.split(",") if m]:
        cmd = [sys.executable, __file__, "--child", n, "--threads", str(args.threads), "--base", str(cfg["base"]),
               "--patch", ",".join(map(str, cfg["patch"])), "--batch", str(cfg["batch"])]
        res[n] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    u = res.get("unet3d") or res.get("unet3d+plain")
    rows = [[n, r["seconds"], r["seconds"] / u["seconds"] if u else float("nan"), r["peak"] - r["before"],
             r["peak"], r["peak"] / u["peak"] if u else float("nan")] for n, r in res.items()]
    table(["model", "step s", "x unet3d time", "step peak RSS increase MiB", "peak RSS MiB", "x unet3d peak RSS"],
          rows)


def flops(name, cfg, plain=False) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model, x, y, opt = _setup(name, cfg, plain=plain)
    with FlopCounterMode(display=False) as fc:
        _step_fn(model, x, y, opt)()
    return int(fc.get_total_flops())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--models", default="sepnet,sepnet_se,unet3d,unet3d_res",
                   help=f"comma-separated network names out of {', '.join(MODELS)}")
    p.add_argument("--base", type=int, default=12)
    p.add_argument("--patch", default="16,64,64", help="z,y,x voxels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--memory-only", action="store_true", help="only peak RSS and step time per model (+ckpt ok)")
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    if args.memory_only:
        header("Models: peak memory of a training step", args)
        memory_table(args)
        return
    set_threads(args)
    import torch

    header("Models: SepNet vs 3D U-Nets, one training step", args)
    cfg = _cfg(args)
    names = ["sepnet", "unet3d"] if args.quick else [n for n in args.models.split(",") if n]
    reps = args.reps or (2 if args.quick else 3)
    print(f"Input (B, C, Z, Y, X) = ({cfg['batch']}, 1, {', '.join(map(str, cfg['patch']))}), base {cfg['base']}, "
          f"23 classes, Adam; {reps} repetitions, alternating, after one warm-up round.\n")
    from sepnet.core.networks import count_parameters

    setups = {n: _setup(n, cfg) for n in names}
    items = {n: _step_fn(*s) for n, s in setups.items()}
    if "sepnet" in names:
        sp_plain = _setup("sepnet", cfg, plain=True)
        items["sepnet (plain Conv3d)"] = _step_fn(*sp_plain)
    a = torch.rand(2048, 2048)
    b = torch.rand(2048, 2048)
    items["matmul 2048^2 fp32"] = lambda: a @ b
    times = alternate(items, reps=reps, warmup=1)
    mm_rate = 2 * 2048**3 / median(times["matmul 2048^2 fp32"])
    print(f"Matmul 2048x2048 float32: {mm_rate / 1e9:.1f} GFLOP/s (median).\n")
    rows, res = [], {}
    for n in list(items):
        if n.startswith("matmul"):
            continue
        base_name = "sepnet" if n.startswith("sepnet (plain") else n
        plain = n.startswith("sepnet (plain")
        fl = flops(base_name, cfg, plain=plain)
        t = median(times[n])
        cmd = [sys.executable, __file__, "--child", base_name + ("+plain" if plain else ""), "--threads",
               str(args.threads), "--base", str(cfg["base"]), "--patch", ",".join(map(str, cfg["patch"])),
               "--batch", str(cfg["batch"])]
        if plain and args.quick:
            mem = {"peak": float("nan"), "before": float("nan")}  # quick: one subprocess fewer
        else:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            mem = json.loads(out.stdout.strip().splitlines()[-1])
        params = count_parameters(setups[base_name][0])
        res[n] = dict(t=t, fl=fl, mem=mem["peak"] - mem["before"], peak=mem["peak"])
        rows.append([n, params, t, fl / 1e9, fl / t / 1e9, fl / t / mm_rate, mem["peak"] - mem["before"],
                     mem["peak"]])
    ref = res.get("unet3d", {}).get("t")
    for r in rows:
        r.insert(3, r[2] / ref if ref else float("nan"))
    table(["model", "parameters", "step s (median)", "x unet3d time", "GFLOP fwd+bwd", "GFLOP/s",
           "fraction of matmul FLOP/s", "step peak RSS increase MiB", "peak RSS MiB"], rows)
    if "sepnet" in names:
        m_fast = setups["sepnet"][0].eval()
        m_plain = sp_plain[0].eval()
        m_plain.load_state_dict(m_fast.state_dict())
        with torch.no_grad():
            x = setups["sepnet"][1]
            d = (m_fast(x) - m_plain(x)).abs().max().item()
        sf = res["sepnet"]
        print(f"SepNet fast path vs plain Conv3d: max |logit diff| = {d:.2e} (eval mode, same weights); "
              f"plain / fast step time = {res['sepnet (plain Conv3d)']['t'] / sf['t']:.2f}x.\n")
        trows = []
        if "unet3d" in res:
            u = res["unet3d"]
            trows += [["SepNet step <= 0.55x 3D-UNet", f"{sf['t'] / u['t']:.2f}x", verdict(sf["t"] / u["t"] <= 0.55)],
                      ["SepNet peak memory <= 3D-UNet", f"{sf['mem']:.0f} vs {u['mem']:.0f} MiB",
                       verdict(sf["mem"] <= u["mem"])]]
        frac = sf["fl"] / sf["t"] / mm_rate
        trows += [["SepNet >= 80% of matmul FLOP/s", f"{100 * frac:.0f}%", verdict(frac >= 0.8)],
                  ["fast path == plain Conv3d (float tolerance)", f"{d:.1e}", verdict(d < 1e-3)]]
        table(["target", "measured", "verdict"], trows)
    if cuda_note("GPU (CUDA, AMP bf16) step times"):
        gitems = {}
        for n in names:
            m, x, y, opt = _setup(n, cfg, device="cuda")
            gitems[n] = _step_fn(m, x, y, opt, amp=True)
        gt = alternate(gitems, reps=max(reps, 5), warmup=2)
        table(["model (CUDA, AMP)", "step ms (median)", "x unet3d"],
              [[n, 1000 * median(v), median(v) / median(gt["unet3d"]) if "unet3d" in gt else float("nan")]
               for n, v in gt.items()])


def argparse_hidden() -> str:
    return "internal: measure peak memory of one model in this process"


if __name__ == "__main__":
    main()
