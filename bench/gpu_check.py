"""GPU check: training steps, whole-volume inference, the 6-member ensemble and a 2-rank nccl step on CUDA.

One command, <= 5 minutes on one GPU, no downloads, random seeded weights (timing only); docs/benchmarks.md
("GPU check") describes every row. Rows, each with its target beside it:

- training step (forward + ATH-L_Exp + backward + Adam) of base-24 ``sepnet`` and ``unet3d``, batch 2, 16x128x128,
  in fp32 / bf16 autocast x channels-last-3d off / on x torch.compile off / on: median step s after warm-up,
  peak GPU memory; target SepNet <= 0.55x the 3D-UNet at the same settings (FLOP ratio 0.51). Compiled rows run
  last, each only while ``--budget-s`` leaves room; a failing configuration is a row, not a crash;
- whole-volume ``sliding_window`` inference of a 120x256x256 case per model;
- the 6-member SepNet ensemble + uncertainty end to end (windows, ``rank_weights`` + streaming ``fuse``, labels,
  ``vote_entropy``, ``member_volumes`` + ``vvc``); target < 10 s per case;
- 2 ranks (spawn, 127.0.0.1, ``init_distributed``, nccl): an exact all-reduce, DDP steps, equal weights after;
  "skipped: 1 GPU" with fewer GPUs (``--quick`` on the CPU runs it with gloo, so the path is tested).

Run: ``.venv/bin/python bench/gpu_check.py [--json OUT]``; ``--quick``: tiny sizes, 1 step, on the CPU too
(compile backend "eager"). Without CUDA and without ``--quick`` it exits 2.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import fmt, header, median, parser, table, verdict

from sepnet.core.ensemble import fuse, member_volumes, rank_weights, vote_entropy, vvc
from sepnet.core.inference import sliding_window
from sepnet.core.losses import build_loss
from sepnet.core.networks import build
from sepnet.core.organs import NUM_CLASSES
from sepnet.hpc.atomic import atomic_write_json
from sepnet.hpc.distributed import cleanup, init_distributed

MODELS = ("sepnet", "unet3d")
STEP_TARGET = 0.55
ENSEMBLE_TARGET_S = 10.0
SPACING_ZYX = (3.0, 1.0, 1.0)
COLUMNS = ("check", "model", "precision", "channels-last", "compile", "median s", "warm-up s", "peak GPU MiB",
           "x unet3d", "target", "verdict", "status")


def config(quick: bool) -> dict:
    """Sizes of every check; quick: tiny (a CPU smoke run of seconds)."""
    if quick:
        return dict(base=2, batch=2, patch=(8, 16, 16), volume=(12, 24, 24), window=(8, 16, 16), members=6,
                    warmup=1, steps=1, infer_batch=2, infer_reps=1, ddp_steps=1)
    return dict(base=24, batch=2, patch=(16, 128, 128), volume=(120, 256, 256), window=(16, 128, 128), members=6,
                warmup=3, steps=10, infer_batch=4, infer_reps=2, ddp_steps=5)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    gc.collect()  # a failed row's traceback may hold tensors until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _timed(fn, reps: int, device) -> list[float]:
    """Wall seconds of ``reps`` synchronised calls of ``fn``."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _row(check: str, model: str, *, precision: str, channels_last: bool = False, compiled: bool = False,
         **extra) -> dict:
    return dict(check=check, model=model, precision=precision, channels_last=channels_last, compile=compiled, **extra)


def _guarded(row: dict, device, measure) -> dict:
    """``row`` updated with ``measure()``'s dict, peak memory and status ok; a failure becomes its status."""
    try:
        _reset_peak(device)
        torch.manual_seed(0)  # dropout masks: every row starts from the same RNG state, whatever ran before
        row.update(measure(), status="ok")
        row.setdefault("peak_mib", _peak_mib(device))
    except Exception as exc:  # noqa: BLE001 - a failing configuration (compile, OOM, nccl) is a row, not a crash
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        row["status"] = f"failed: {type(exc).__name__}: {first}".rstrip(": ")
    return row


def _model(name: str, cfg: dict, device, *, seed: int = 0):
    return build(name, in_channels=1, num_classes=NUM_CLASSES, base=cfg["base"], seed=seed).to(device)


def _batch(cfg: dict, device, *, seed: int = 0):
    """(x, y): float32 (B, 1, *patch) in [0, 1) and int64 labels (B, *patch), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((cfg["batch"], 1, *cfg["patch"]), generator=g)
    return x.to(device), torch.randint(0, NUM_CLASSES, (cfg["batch"], *cfg["patch"]), generator=g).to(device)


def _step(net, x, y, *, bf16: bool):
    """A closure: forward (autocast bf16 if asked) + ATH-L_Exp + backward + Adam step of ``net``."""
    loss_fn, opt = build_loss("ath_exp_log"), torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        loss_fn(out, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_row(name: str, cfg: dict, device, *, precision: str, channels_last: bool, compiled: bool,
              backend: str) -> dict:
    """Median seconds of ``cfg["steps"]`` steps after ``cfg["warmup"]`` steps (those include any compile)."""
    def measure() -> dict:
        model, (x, y) = _model(name, cfg, device), _batch(cfg, device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        net = torch.compile(model, backend=backend) if compiled else model
        step = _step(net, x, y, bf16=precision == "bf16")
        warm = sum(_timed(step, cfg["warmup"], device))
        return dict(seconds=median(_timed(step, cfg["steps"], device)), warmup_s=warm)

    row = _guarded(_row("train step", name, precision=precision, channels_last=channels_last, compiled=compiled),
                   device, measure)
    if compiled:
        torch._dynamo.reset()
    _reset_peak(device)
    return row


def _amp(device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def _predictor(model, device):
    """Eval-mode logits under bf16 autocast on CUDA (float32 elsewhere), as predict runs members."""
    model = model.to(device).eval()

    def predict(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_amp(device) == "bf16"):
            return model(batch).float()

    return predict


def _windows(predictor, volume, cfg: dict, device):
    return sliding_window(volume, predictor, num_classes=NUM_CLASSES, patch=cfg["window"], overlap=0.5,
                          batch_size=cfg["infer_batch"], device=device)


def _warm(predictor, cfg: dict, device) -> None:
    with torch.inference_mode():
        predictor(torch.zeros((cfg["infer_batch"], 1, *cfg["window"]), device=device))
    _sync(device)


def infer_row(name: str, volume: np.ndarray, cfg: dict, device) -> dict:
    """Whole-volume sliding-window probabilities of one model; seconds include the volume's copy to the device."""
    def measure() -> dict:
        pred = _predictor(_model(name, cfg, device), device)
        _warm(pred, cfg, device)
        run = lambda: _windows(pred, torch.from_numpy(volume).to(device), cfg, device)  # noqa: E731
        return dict(seconds=median(_timed(run, cfg["infer_reps"], device)))

    shape = "x".join(map(str, cfg["volume"]))
    return _guarded(_row(f"inference {shape}", name, precision=_amp(device), target="-"), device, measure)


def ensemble_once(members, volume: np.ndarray, cfg: dict, device) -> dict:
    """Labels + uncertainty of one case from N members, end to end; returns the outputs' summary."""
    t_start = time.perf_counter()
    vol = torch.from_numpy(volume).to(device)
    labels, windows_s = [], []

    def member_probs():  # one member's probabilities at a time; the fused sum is the only other full map
        for m in members:
            t0 = time.perf_counter()
            p = _windows(m, vol, cfg, device).to(device)  # returned on the CPU; fusion and argmax on the device
            windows_s.append(time.perf_counter() - t0)
            labels.append(p.argmax(0).to(torch.uint8))
            yield p

    dice = np.random.default_rng(0).uniform(0.5, 0.9, (len(members), NUM_CLASSES))  # stands in for validation
    fused = fuse(member_probs(), rank_weights(dice))
    fused_labels = fused.argmax(0).to(torch.uint8).cpu().numpy()
    stack = torch.stack(labels).cpu().numpy()
    entropy = vote_entropy(stack)
    vv = vvc(member_volumes(stack, spacing_zyx=SPACING_ZYX))
    total = time.perf_counter() - t_start
    return dict(labels_shape=fused_labels.shape, entropy_max=float(entropy.max()),
                vvc_finite=int(np.isfinite(vv).sum()), windows_s=sum(windows_s), rest_s=total - sum(windows_s))


def ensemble_row(volume: np.ndarray, cfg: dict, device) -> dict:
    """The N-member SepNet ensemble + uncertainty of one case, end to end (members built and warmed first)."""
    n = cfg["members"]
    outputs: dict = {}

    def measure() -> dict:
        members = [_predictor(_model("sepnet", cfg, device, seed=i), device) for i in range(n)]
        for m in members:
            _warm(m, cfg, device)
        s = median(_timed(lambda: outputs.update(ensemble_once(members, volume, cfg, device)), cfg["infer_reps"],
                          device))
        return dict(seconds=s, verdict=verdict(s < ENSEMBLE_TARGET_S), outputs=outputs)

    return _guarded(_row("ensemble + uncertainty", f"{n} x sepnet", precision=_amp(device),
                         target=f"< {ENSEMBLE_TARGET_S:g} s per case"), device, measure)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cfg: dict, backend: str, queue) -> None:
    """One spawned rank: the project's rendezvous, a checked all-reduce, timed DDP steps, a parameter check."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    env = init_distributed(backend=backend, rendezvous_timeout_s=60.0, timeout_s=120.0)
    device = torch.device(env.device)
    t = torch.full((1 << 20,), float(rank + 1), device=device)
    dist.all_reduce(t)
    reduce_ok = bool(torch.all(t == world * (world + 1) / 2).item())
    model = _model("sepnet", cfg, device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    x, y = _batch(cfg, device, seed=rank)  # different data per rank: DDP must still keep the weights equal
    times = _timed(_step(net, x, y, bf16=device.type == "cuda"), cfg["warmup"] + cfg["ddp_steps"], device)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    spread = float((hi - lo).abs().max().item())
    if rank == 0:
        queue.put(dict(seconds=median(times[cfg["warmup"]:]), peak_mib=_peak_mib(device), reduce_ok=reduce_ok,
                       spread=spread))
    cleanup()


def ddp_row(cfg: dict, *, quick: bool) -> dict:
    """2-rank nccl step where 2 GPUs exist; gloo on CPU under --quick; else a skipped row."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus >= 2 else ("gloo" if quick else None)
    row = _row(f"DDP step, 2 ranks ({backend or 'nccl'})", "sepnet", precision="bf16" if backend == "nccl" else "fp32",
               target="all-reduce exact, weights equal")
    if backend is None:
        return dict(row, status=f"skipped: {gpus} GPU")

    def measure() -> dict:
        q = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_ddp_rank, args=(2, _free_port(), cfg, backend, q), nprocs=2, join=True,
                           start_method="spawn")
        r = q.get()
        return dict(seconds=r["seconds"], peak_mib=r["peak_mib"], verdict=verdict(r["reduce_ok"] and r["spread"] == 0),
                    outputs=dict(reduce_ok=r["reduce_ok"], param_spread=r["spread"]))

    return _guarded(row, torch.device("cpu"), measure)


def compare(rows: list[dict]) -> None:
    """Fill SepNet's step ratio against the 3D-UNet at the same precision / channels-last / compile."""
    key = lambda r: (r["precision"], r["channels_last"], r["compile"])  # noqa: E731
    unet = {key(r): r for r in rows if r["model"] == "unet3d" and r.get("status") == "ok"}
    for r in rows:
        if r["model"] == "unet3d":
            r["target"] = "reference"
        elif r["model"] == "sepnet" and r.get("status") == "ok" and key(r) in unet:
            r["ratio"] = r["seconds"] / unet[key(r)]["seconds"]
            r["verdict"] = verdict(r["ratio"] <= STEP_TARGET)
        if r["model"] == "sepnet":
            r["target"] = f"<= {STEP_TARGET}x unet3d"


def train_rows(cfg: dict, device, *, backend: str, budget_s: float, t_start: float, later) -> list[dict]:
    """Every training combination: eager rows now, then ``later()`` (inference, ...), then the compiled rows
    while the budget allows (each needs about the longest compile seen so far, 60 s before the first)."""
    combos = [(m, p, cl, c) for c in (False, True) for p in ("bf16", "fp32") for cl in (False, True) for m in MODELS]
    run = lambda k: train_row(k[0], cfg, device, precision=k[1], channels_last=k[2], compiled=k[3],  # noqa: E731
                              backend=backend)
    rows = {k: run(k) for k in combos if not k[3]}
    later()
    need = 60.0 if device.type == "cuda" else 0.0
    for k in (k for k in combos if k[3]):
        if time.perf_counter() - t_start + need > budget_s:
            rows[k] = _row("train step", k[0], precision=k[1], channels_last=k[2], compiled=True,
                           status=f"skipped: time budget ({budget_s:g} s, --budget-s)")
        else:
            rows[k] = run(k)
            need = max(need, rows[k].get("warmup_s", 0.0))
    return [rows[k] for k in sorted(combos, key=lambda k: MODELS.index(k[0]))]  # stable: per model, combo order


def _cells(r: dict) -> list:
    num = lambda k: "n/a" if r.get(k) is None else r[k]  # noqa: E731
    onoff = lambda b: "on" if b else "off"  # noqa: E731
    return [r["check"], r["model"], r["precision"], onoff(r["channels_last"]), onoff(r["compile"]), num("seconds"),
            num("warmup_s"), num("peak_mib"), num("ratio"), r.get("target", ""), r.get("verdict", "n/a"), r["status"]]


def summary(rows: list[dict]) -> list[list]:
    """Target table: the fastest SepNet step over the fastest 3D-UNet step, and the ensemble's seconds."""
    ok = [r for r in rows if r["check"] == "train step" and r["status"] == "ok"]
    best = [min((r["seconds"] for r in ok if r["model"] == m), default=None) for m in MODELS]
    ratio = best[0] / best[1] if None not in best else None
    ens = next(r for r in rows if r["check"].startswith("ensemble"))
    return [[f"SepNet step <= {STEP_TARGET}x 3D-UNet (fastest setting of each)",
             "n/a" if ratio is None else f"{ratio:.2f}x", verdict(None if ratio is None else ratio <= STEP_TARGET)],
            [f"6-member ensemble + uncertainty < {ENSEMBLE_TARGET_S:g} s per case",
             "n/a" if ens.get("seconds") is None else f"{fmt(ens['seconds'])} s", ens.get("verdict", "n/a")]]


def device_info(device) -> dict:
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                device=str(device), name="CPU", gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)))
    return info


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(threads=None)
    p.add_argument("--json", default=None, metavar="OUT", help="write device info, sizes and rows as JSON")
    p.add_argument("--budget-s", type=float, default=285.0, help="compiled rows start only within this budget")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; quick: eager)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.quick:
        print("gpu_check: no CUDA device (use --quick for a CPU smoke run)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    if args.threads is None:  # quick (CI, shared cores): 1 thread, as the other benchmarks; else every core
        args.threads = 1 if args.quick else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(args.threads)))
    torch.manual_seed(0)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    cfg = config(args.quick)
    backend = args.compile_backend or ("eager" if args.quick else "inductor")
    header("GPU check: training steps, inference, ensemble, DDP", args)
    info = device_info(device)
    dims = {k: "x".join(map(str, cfg[k])) for k in ("patch", "volume", "window")}
    print(f"Device: {info['name']} ({info['device']}, {info['gpus']} GPU(s)), torch {info['torch']}, CUDA "
          f"{info['cuda']}, cuDNN {info['cudnn']}; compile backend {backend}; base {cfg['base']}, batch "
          f"{cfg['batch']}, patch {dims['patch']}, {cfg['steps']} timed steps after {cfg['warmup']} warm-up; "
          f"volume {dims['volume']}, windows {dims['window']} overlap 0.5.\n", flush=True)
    if args.quick:
        print("Quick mode: tiny sizes, so the verdicts say nothing about the targets; the run checks the paths.\n")
    volume = np.random.default_rng(0).random((1, *cfg["volume"]), dtype=np.float32)
    others: list[dict] = []

    def later() -> None:
        others.extend(infer_row(m, volume, cfg, device) for m in MODELS)
        others.append(ensemble_row(volume, cfg, device))
        others.append(ddp_row(cfg, quick=args.quick))

    rows = train_rows(cfg, device, backend=backend, budget_s=args.budget_s, t_start=t_start, later=later)
    compare(rows)
    rows += others
    table(COLUMNS, [_cells(r) for r in rows])
    table(["target", "measured", "verdict"], summary(rows))
    print(f"Total {time.perf_counter() - t_start:.0f} s.")
    if args.json:
        atomic_write_json(args.json, dict(info=info, quick=args.quick, config=cfg, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
