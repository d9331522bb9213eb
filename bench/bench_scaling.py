"""Data-parallel training throughput: 1 vs 2 DDP processes (gloo, CPU); nccl + AMP where CUDA exists.

Each rank (``torch.multiprocessing`` spawn, 1 torch thread) trains SepNet on random patches with
``DistributedDataParallel``; throughput = world x batch x steps / rank 0's wall time over the timed steps
(after warm-up steps, so process start and DDP set-up are excluded). World sizes alternate over repetitions.
On this 2-core machine shared with other jobs, 2 ranks can at best double throughput.

Run: ``.venv/bin/python bench/bench_scaling.py [--quick]``.
"""

from __future__ import annotations

import os
import socket
import time

from _common import cuda_note, header, median, parser, table, verdict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, cfg, backend, out):
    import torch
    import torch.distributed as dist

    from sepnet.core.networks import build

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    model = build("sepnet", in_channels=1, num_classes=23, base=cfg["base"], seed=0).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if backend == "nccl" else None)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.rand((cfg["batch"], 1) + cfg["patch"], generator=g).to(device)
    y = torch.randint(0, 23, (cfg["batch"],) + cfg["patch"], generator=g).to(device)
    amp = backend == "nccl"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out_ = net(x)
        torch.nn.functional.cross_entropy(out_.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(cfg["warmup"]):
        step()
    dist.barrier()
    if amp:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    if amp:
        torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        out.put(time.perf_counter() - t0)
    dist.destroy_process_group()


def run_world(world, cfg, backend="gloo") -> float:
    """Patches/s of ``world`` ranks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(world, _free_port(), cfg, backend, q), nprocs=world, join=True,
                       start_method="spawn")
    secs = q.get()
    return world * cfg["batch"] * cfg["steps"] / secs


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    header("Scaling: DDP throughput with 1 and 2 processes", args)
    cfg = dict(base=4, patch=(16, 32, 32), batch=2, steps=3, warmup=1) if args.quick else \
        dict(base=8, patch=(16, 64, 64), batch=2, steps=6, warmup=2)
    reps = args.reps or (1 if args.quick else 3)
    print(f"SepNet base {cfg['base']}, patch {cfg['patch']}, batch {cfg['batch']} per rank, {cfg['steps']} timed "
          f"steps after {cfg['warmup']} warm-up steps, 1 torch thread per rank, {reps} repetitions alternating "
          "world sizes.\n")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(reps):
        for w in ((1, 2) if r % 2 == 0 else (2, 1)):
            rates[w].append(run_world(w, cfg))
    r1, r2 = median(rates[1]), median(rates[2])
    table(["processes (gloo, CPU)", "patches/s (median)", "speed-up", "efficiency"],
          [[1, r1, 1.0, 1.0], [2, r2, r2 / r1, r2 / r1 / 2]])
    table(["target", "measured", "verdict"],
          [["2 ranks faster than 1 on 2 cores (efficiency reported, no fixed target)", f"{r2 / r1:.2f}x",
            verdict(r2 > r1)]])
    if cuda_note("GPU DDP (nccl, AMP bf16)"):
        import torch

        n = torch.cuda.device_count()
        gcfg = dict(base=24, patch=(16, 128, 128), batch=2, steps=20, warmup=3)
        worlds = [w for w in (1, 2, 4, 8) if w <= n]
        rows = []
        for w in worlds:
            rate = median([run_world(w, gcfg, backend="nccl") for _ in range(max(1, reps))])
            rows.append([w, rate])
        table(["GPUs (nccl, AMP, base 24, 16x128x128, batch 2/GPU)", "patches/s"], rows)


if __name__ == "__main__":
    main()
