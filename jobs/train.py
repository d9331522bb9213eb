"""``sepnet train``: train one model (network x transform x loss x alpha) on one fold, resumably.

:class:`TrainTask` is the submitit callable (picklable, checkpointable): it runs under the debug,
local or SLURM executor, alone or as one DDP rank of several (one task per GPU; gloo on CPU).
Protocol (paper Sec. 4): Adam (lr 1e-3, weight decay 1e-8), lr x0.9 every ``lr_step_epochs``
epochs of ``iterations_per_epoch`` iterations, random patches (``PatchDataset``, sharded by rank),
AMP on CUDA only. Validation (``sepnet.jobs.validation``) on whole validation volumes every
``val_every`` iterations and at the end (rank 0), best checkpoint by mean foreground Dice.

Outputs in ``<study>/models/fold<F>/<member>/``: ``spec.json`` (the :class:`~sepnet.jobs.spec.ModelSpec`,
written at the start), ``last.pt`` (every ``checkpoint_every`` iterations: model, optimizer, scheduler,
scaler, step, RNG states of every rank, best score), ``best.pt`` (model + validation Dice), ``done.json``
(written last; a rerun with it present returns at once).

Resumption is exact: on CPU with a fixed seed, a run interrupted after a checkpoint and resumed
ends with weights bit-identical to an uninterrupted run. That needs patches indexed by (epoch, i),
every rank's RNG state restored, the data stream restarted at the checkpoint's index within the
epoch, a DataLoader that draws its seed from its own generator (not the global RNG), and
deterministic kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sepnet.core.errors import ConfigError, DataError, SubmissionError
from sepnet.core.inference import autocast, autocast_dtype
from sepnet.core.organs import ORGAN_NAMES
from sepnet.hpc import checkpoint as ckpt
from sepnet.hpc import distributed as ddp
from sepnet.hpc.atomic import atomic_write_json
from sepnet.hpc.checkpoint import Checkpointable
from sepnet.jobs.spec import SPEC_FILE, TrainSpec, train_spec
from sepnet.jobs.tracking import RunTracker
from sepnet.jobs.validation import jsonable_dice, mean_foreground, validate

log = logging.getLogger(__name__)

LAST, BEST, DONE = "last.pt", "best.pt", "done.json"


# --------------------------------------------------------------------------- the task

class TrainTask(Checkpointable):
    """Callable training one model; requeued by submitit on preemption/time-out, resumes from last.pt.

    ``TrainTask(spec)()`` returns the content of ``done.json`` (dict), or ``{"stopped_at": step}``
    when ``spec.stop_after`` stopped it early. Every rank returns the same dict.
    """

    def __init__(self, spec: TrainSpec):
        self.spec = spec

    def fresh(self) -> TrainTask:
        return TrainTask(self.spec)

    def __call__(self) -> dict[str, Any]:
        done = self.spec.out_dir / DONE
        if done.is_file():
            return json.loads(done.read_text())
        env = ddp.init_distributed()
        try:
            with torch.enable_grad():  # whatever grad mode the calling process (debug executor) is in
                return _train(self.spec, env)
        finally:
            ddp.cleanup()


class _RangeSampler(torch.utils.data.Sampler):
    """Indices ``start, start+1, ..., stop-1``: restarts an epoch's patch stream mid-way."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class _Progress:
    """What a checkpoint carries besides the weights and optimizer state."""

    step: int = 0
    best_score: float = -math.inf
    best_dice: list[float | None] | None = None
    train_seconds: float = 0.0  # of earlier runs of this job (before the last resume)
    resumed_from: list[int] = field(default_factory=list)


@dataclass
class _Run:
    """One training run of one rank: the model, its optimisation state and where it writes."""

    spec: TrainSpec
    env: ddp.DistEnv
    model: torch.nn.Module
    net: torch.nn.Module  # the model, DDP-wrapped when distributed
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    store: Any
    tracker: RunTracker
    t0: float = field(default_factory=time.time)
    progress: _Progress = field(default_factory=_Progress)

    @property
    def out(self) -> Path:
        return self.spec.out_dir

    def seconds(self) -> float:
        return self.progress.train_seconds + (time.time() - self.t0)


def _train(spec: TrainSpec, env: ddp.DistEnv) -> dict[str, Any]:
    """The whole job on this rank: set up, resume, iterate, finish."""
    t0 = time.time()
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        spec.model_spec().write(spec.out_dir)
    _configure_torch(spec, device=env.device)
    run = _build(spec, env, t0=t0)
    stop_at = min(spec.total_iterations, spec.stop_after) if spec.stop_after is not None else spec.total_iterations
    _iterate(run, stop_at=stop_at)
    if run.progress.step < spec.total_iterations:  # stopped early on purpose: resumable, not done
        run.tracker.flush()
        return {"stopped_at": run.progress.step}
    if env.is_main:
        _write_done(run)
    ddp.barrier()
    return json.loads((spec.out_dir / DONE).read_text())


def _configure_torch(spec: TrainSpec, *, device: str) -> None:
    """Deterministic kernels (warn, do not fail, where some CUDA op has none) and the thread count."""
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # the allocation, not the node's core count: several local jobs each using every core oversubscribe it
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    elif cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))


def _build(spec: TrainSpec, env: ddp.DistEnv, *, t0: float) -> _Run:
    """Network, loss, optimizer, scheduler and scaler, restored from last.pt when it exists.

    The order of the random draws here (network init, then the per-rank seed or the restored RNG)
    is part of the bit-identical-resume contract.
    """
    from sepnet.core.losses import build_loss
    from sepnet.core.networks import build, set_checkpointing
    from sepnet.data.store import Store

    tr, device = spec.training, env.device
    model = build(spec.member.network, in_channels=len(spec.channels), num_classes=spec.num_classes,
                  base=spec.base, separable_axis=spec.member.separable_axis, seed=tr.seed).to(device)
    set_checkpointing(model, tr.checkpoint_blocks)
    optimizer = torch.optim.Adam(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    amp_dtype = autocast_dtype(device, cuda=tr.amp, cpu_bf16=tr.cpu_bf16)
    run = _Run(
        spec=spec, env=env, model=model, net=model, loss_fn=build_loss(spec.member.loss, alpha=spec.member.alpha),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=tr.lr_step_epochs, gamma=tr.lr_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
        store=Store(spec.store), tracker=_tracker(spec, enabled=env.is_main), t0=t0,
    )
    _resume_or_seed(run)
    if env.distributed:
        run.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.startswith("cuda") else None)
    return run


def _resume_or_seed(run: _Run) -> None:
    """Load last.pt (weights, optimizer, RNG of this rank) if present, else seed this rank's RNG."""
    spec, env, tr = run.spec, run.env, run.spec.training
    last = run.out / LAST
    if not last.is_file():
        torch.manual_seed(tr.seed * 1000 + env.rank)  # dropout masks differ per rank, reproducibly
        if env.device.startswith("cuda"):
            torch.cuda.manual_seed_all(tr.seed * 1000 + env.rank)
        return
    state = ckpt.load(last)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    run.progress = _Progress(step=step, best_score=float(state["best_score"]), best_dice=state.get("best_dice"),
                             train_seconds=float(state.get("train_seconds", 0.0)),
                             resumed_from=list(state.get("resumed_from", [])) + [step])
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        ckpt.set_rng_state(rngs[env.rank])
    else:  # a different world size cannot replay the same stream; keep going deterministically
        log.warning("checkpoint has %d RNG states for %d ranks: reseeding", len(rngs), env.world_size)
        torch.manual_seed(tr.seed * 1000 + env.rank + step)
    if env.is_main:
        log.info("resuming %s from iteration %d", spec.out_dir, step)


def _tracker(spec: TrainSpec, *, enabled: bool) -> RunTracker:
    """The MLflow run of this model (rank 0 only), found again by its key on resume."""
    tags = {"sepnet.fold": str(spec.fold), "sepnet.member": spec.member.name,
            "sepnet.executor_job_id": _executor_job_id(), **spec.extra_tags}
    params = {"member": asdict(spec.member), "training": asdict(spec.training), "fold": spec.fold,
              "num_classes": spec.num_classes, "organs": spec.organs, "n_train_cases": len(spec.train_cases),
              "n_val_cases": len(spec.val_cases)}
    return RunTracker(spec.mlflow_uri, enabled=enabled, experiment=spec.experiment, key=spec.run_key,
                      name=f"fold{spec.fold}/{spec.member.name}", parent_run_id=spec.parent_run_id, tags=tags,
                      params=params, config_text=spec.config_text, system_metrics=True)


def _executor_job_id() -> str:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return "none"


def _loader(run: _Run) -> tuple[Any, _RangeSampler, torch.utils.data.DataLoader]:
    """The patch dataset of this rank and one loader for the whole run.

    With workers they persist, so their decompressed-case caches survive epochs (the epoch reaches
    them through the dataset's shared memory). Its own generator: creating an iterator must not draw
    from the global RNG (resume mid-epoch).
    """
    from sepnet.data.sampler import PatchDataset

    spec, tr, env = run.spec, run.spec.training, run.env
    per_iter = tr.batch_size * tr.grad_accum  # samples per iteration per rank
    ipe = tr.iterations_per_epoch
    dataset = PatchDataset(run.store, spec.train_cases, channels=spec.channels, patch=tr.patch,
                           samples_per_epoch=ipe * per_iter, foreground_fraction=tr.foreground_fraction,
                           seed=tr.seed, rank=env.rank, world_size=env.world_size, pad=tr.pad,
                           subset=spec.subset)
    sampler = _RangeSampler(0, ipe * per_iter)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tr.batch_size, sampler=sampler, num_workers=tr.num_workers,
        generator=torch.Generator().manual_seed(tr.seed), pin_memory=env.device.startswith("cuda"),
        persistent_workers=tr.num_workers > 0,
    )
    return dataset, sampler, loader


class _TimedBatches:
    """An iterator that adds the seconds spent waiting for the next batch to ``wait_s``."""

    def __init__(self, it: Iterator):
        self.it, self.wait_s = it, 0.0

    def __iter__(self) -> _TimedBatches:
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait_s += time.perf_counter() - t


class _ProgressLine:
    """One line to stdout (the job's log) every ``log_every`` iterations or ``log_period_s`` seconds:
    iteration/total, loss, lr, it/s and data-wait share since the last line, ETA (rank 0 only)."""

    def __init__(self, run: _Run):
        self.run, self.tag = run, f"fold{run.spec.fold}/{run.spec.member.name}"
        self.t, self.step, self.wait = time.perf_counter(), run.progress.step, 0.0

    def __call__(self, loss: float, wait_s: float) -> None:
        run, tr, step = self.run, self.run.spec.training, self.run.progress.step
        now, total = time.perf_counter(), run.spec.total_iterations
        if not run.env.is_main or not (step - self.step >= tr.log_every or now - self.t >= tr.log_period_s
                                       or step == total):
            return
        dt, n = max(now - self.t, 1e-9), step - self.step
        rate, waited = n / dt, wait_s - self.wait
        eta = (total - step) / rate if rate > 0 else float("inf")
        print(f"progress {self.tag} it {step}/{total} loss {loss:.4f} lr {run.optimizer.param_groups[0]['lr']:.2e} "
              f"{rate:.2f} it/s data-wait {100 * waited / dt:.0f}% ETA {_hms(eta)}", flush=True)
        self.t, self.step, self.wait = now, step, wait_s


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _iterate(run: _Run, *, stop_at: int) -> None:
    """Train from ``run.progress.step`` to ``stop_at``, validating and checkpointing on schedule."""
    tr, p = run.spec.training, run.progress
    ipe, per_iter = tr.iterations_per_epoch, tr.batch_size * tr.grad_accum
    dataset, sampler, loader = _loader(run)
    run.net.train()
    line, waited = _ProgressLine(run), 0.0
    while p.step < stop_at:
        dataset.set_epoch(p.step // ipe)
        sampler.start = (p.step % ipe) * per_iter
        batches = _TimedBatches(iter(loader))
        for _ in range(p.step % ipe, ipe):
            loss = _train_step(run, batches)
            p.step += 1
            line(loss, waited + batches.wait_s)
            if p.step % ipe == 0:
                run.scheduler.step()
            run.tracker.metric("train_loss", loss, p.step)
            run.tracker.metric("lr", run.optimizer.param_groups[0]["lr"], p.step)
            if p.step % tr.val_every == 0 or p.step == run.spec.total_iterations:
                _validate_and_keep_best(run)
            if p.step % tr.checkpoint_every == 0 or p.step == stop_at:
                _save_last(run)
                run.tracker.flush()
            if run.spec.sleep_s:
                time.sleep(run.spec.sleep_s)
            if p.step >= stop_at:
                break
        waited += batches.wait_s
        del batches
    del loader  # ends persistent workers


def _train_step(run: _Run, batches: Iterator) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the loss averaged over ranks."""
    tr, env, device = run.spec.training, run.env, run.env.device
    loss_sum = 0.0
    for micro in range(tr.grad_accum):
        image, label, annotated = next(batches)  # annotated (B, K) bool: the classes each case's dataset draws
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        sync = micro == tr.grad_accum - 1 or not env.distributed
        with (nullcontext() if sync else run.net.no_sync()):
            with autocast(device, run.amp_dtype):
                logits = run.net(image)
            loss = run.loss_fn(logits.float(), label, annotated=annotated.to(device)) / tr.grad_accum
            run.scaler.scale(loss).backward()
        loss_sum += float(loss.detach())
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return ddp.all_reduce_mean(loss_sum)


def _validate_and_keep_best(run: _Run) -> None:
    """Validate on rank 0, save best.pt when the mean foreground Dice improves; share the best with all ranks."""
    spec, p = run.spec, run.progress
    if run.env.is_main and spec.val_cases:
        t_val = time.perf_counter()
        dice = validate(run.model, run.store, spec.val_cases, channels=spec.channels, num_classes=spec.num_classes,
                        patch=spec.val_patch or spec.training.patch, overlap=spec.val_overlap,
                        device=run.env.device, amp_dtype=run.amp_dtype, subset=spec.subset,
                        slabs=spec.training.val_slabs)
        score = mean_foreground(dice)
        print(f"validation fold{spec.fold}/{spec.member.name} it {p.step}/{spec.total_iterations}: mean foreground "
              f"Dice {score:.4f} (best {max(score, p.best_score):.4f}) in {time.perf_counter() - t_val:.1f} s",
              flush=True)
        run.tracker.metric("val_dice_mean_fg", score, p.step)
        for organ, d in zip(spec.organ_ids, dice[1:]):  # by organ name, as evaluation's test_dice_<organ>
            if not math.isnan(d):
                run.tracker.metric(f"val_dice_{ORGAN_NAMES[organ]}", float(d), p.step)
        if score > p.best_score:
            p.best_score, p.best_dice = score, jsonable_dice(dice)
            _save_best(run, score=score)
    p.best_score, p.best_dice = ddp.broadcast_object((p.best_score, p.best_dice))
    run.tracker.flush()


def _save_best(run: _Run, *, score: float | None) -> None:
    ckpt.save_atomic({"model": run.model.state_dict(), "step": run.progress.step, "score": score,
                      "val_dice": run.progress.best_dice}, run.out / BEST)


def _save_last(run: _Run) -> None:
    """last.pt with every rank's RNG state (in rank order), written by rank 0."""
    p = run.progress
    rngs = ddp.all_gather_object(ckpt.rng_state())
    if run.env.is_main:
        ckpt.save_atomic({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": p.step,
            "epoch": p.step // run.spec.training.iterations_per_epoch, "rng": rngs, "best_score": p.best_score,
            "best_dice": p.best_dice, "world_size": run.env.world_size, "train_seconds": run.seconds(),
            "resumed_from": p.resumed_from,
        }, run.out / LAST)
    ddp.barrier()


def _write_done(run: _Run) -> None:
    """best.pt (the last weights when nothing was validated) and done.json, the job's last write."""
    from sepnet.core.networks import count_parameters
    from sepnet.hpc.resources import peak_rss_gib

    spec, p = run.spec, run.progress
    if not (run.out / BEST).exists():  # no validation case: the last weights are the model
        _save_best(run, score=None)
    result = {
        "member": spec.member.name, "fold": spec.fold, "iterations": p.step, "params": count_parameters(run.model),
        "best_score": None if p.best_score == -math.inf else p.best_score, "val_dice": p.best_dice,
        "train_seconds": run.seconds(), "world_size": run.env.world_size, "resumed_from": p.resumed_from,
        "mlflow_run_id": run.tracker.run_id, "peak_rss_gib": round(peak_rss_gib(), 3),
    }
    atomic_write_json(run.out / DONE, result)
    print(f"done fold{spec.fold}/{spec.member.name}: {p.step} iterations in {result['train_seconds']:.0f} s, "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB (rank 0)", flush=True)
    run.tracker.metric("train_seconds", result["train_seconds"], p.step)
    # the model as a run artifact: best.pt loads with torch.load(weights_only=True), spec.json rebuilds it
    run.tracker.log_files([run.out / BEST, run.out / SPEC_FILE, run.out / DONE], "model")
    run.tracker.finish()


# --------------------------------------------------------------------------- submission-time checks

def check_spec(spec: TrainSpec) -> None:
    """Raise SubmissionError for what would fail inside the job: missing store, unknown cases or
    channel, patch larger than a volume with pad false, no training case."""
    from sepnet.data.store import Store

    if not Path(spec.store).is_dir():
        raise SubmissionError(f"{spec.store}: store not found; run `sepnet preprocess` (or `sepnet cv`) first")
    try:
        store = Store(spec.store)
        known = set(store.case_ids)
    except (DataError, OSError, ValueError) as e:
        raise SubmissionError(f"{spec.store}: cannot open the store ({e})") from None
    if not spec.train_cases:
        raise SubmissionError(f"fold {spec.fold}: no training case")
    for cid in list(spec.train_cases) + list(spec.val_cases):
        if cid not in known:
            raise SubmissionError(f"{spec.store}: case {cid!r} of fold {spec.fold} is not in the store")
    p = spec.training.patch
    for cid in spec.train_cases:
        if spec.member.transform not in store.channels(cid):
            raise SubmissionError(f"{spec.store}: case {cid!r} has no channel {spec.member.transform!r} "
                                  f"(stored: {', '.join(store.channels(cid))})")
        shape = tuple(store.meta(cid).stored_shape)
        if not spec.training.pad and any(n < q for n, q in zip(shape, p)):
            raise SubmissionError(f"training.patch {p} is larger than case {cid!r} {list(shape)} (z, y, x) "
                                  "and training.pad is false")


# --------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from sepnet.hpc.executors import KINDS

    p.add_argument("config", help="study YAML")
    p.add_argument("--member", required=True, help="member or baseline name from the config")
    p.add_argument("--fold", type=int, required=True, help="fold index")
    p.add_argument("--executor", choices=KINDS, help="override executor.kind")
    p.add_argument("--no-wait", action="store_true", help="submit and return (prints the job id)")


def run(args: argparse.Namespace) -> int:
    from sepnet.hpc.executors import make_executor, wait
    from sepnet.jobs.config import load_config

    cfg = load_config(args.config)
    if args.executor:
        cfg.executor = dataclasses.replace(cfg.executor, kind=args.executor)
    try:
        spec = train_spec(cfg, model=args.member, fold=args.fold)
    except ConfigError as e:
        raise SubmissionError(str(e)) from None
    check_spec(spec)
    if (spec.out_dir / DONE).is_file():
        print(f"{spec.out_dir}: already trained (done.json present)")
        return 0
    ex = make_executor(cfg.executor, folder=Path(cfg.root) / "logs", name=f"train/fold{spec.fold}/{spec.member.name}")
    job = ex.submit(TrainTask(spec))
    print(f"submitted {cfg.executor.kind} job {job.job_id}: {spec.member.name} fold {spec.fold} -> {spec.out_dir}")
    if args.no_wait and cfg.executor.kind != "debug":
        return 0
    report = wait([job], poll_s=5.0, progress=print)
    if not report.ok:
        for jid, msg in report.failed.items():
            print(f"job {jid} failed: {msg} (logs: {job.paths.stdout.parent})")
        return 1
    res = report.results[str(job.job_id)]
    print(f"done: {res.get('iterations')} iterations, best mean foreground Dice {res.get('best_score')}")
    return 0
