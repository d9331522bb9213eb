"""``sepnet train``: train one model (network x transform x loss x alpha) on one fold, resumably.

:class:`TrainTask` is the submitit callable (picklable, checkpointable): it runs under the debug,
local or SLURM executor, alone or as one DDP rank of several (one task per GPU; gloo on CPU).
Protocol (paper Sec. 4): Adam (lr 1e-3, weight decay 1e-8), lr x0.9 every ``lr_step_epochs``
epochs of ``iterations_per_epoch`` iterations, random patches (``PatchDataset``, sharded by rank),
AMP on CUDA only. Validation on whole validation volumes every ``val_every`` iterations and at the
end (rank 0), best checkpoint by mean foreground Dice.

Outputs in ``<study>/models/fold<F>/<member>/``: ``last.pt`` (every ``checkpoint_every`` iterations:
model, optimizer, scheduler, scaler, step, RNG states of every rank, best score), ``best.pt``
(model + validation Dice), ``done.json`` (written last; a rerun with it present returns at once).

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

import numpy as np
import torch

from sepnet.core.errors import ConfigError, DataError, SubmissionError
from sepnet.hpc import checkpoint as ckpt
from sepnet.hpc import distributed as ddp
from sepnet.hpc.checkpoint import Checkpointable
from sepnet.jobs.config import MemberConfig, TrainingConfig

log = logging.getLogger(__name__)

LAST, BEST, DONE = "last.pt", "best.pt", "done.json"


@dataclass
class TrainSpec:
    """Everything one training job needs; small and picklable (no arrays, no open handles).

    study_root: the study folder (outputs go to ``models/fold<fold>/<member>/`` below it).
    store: the Zarr store path. train_cases / val_cases: case ids of this fold.
    mlflow_uri: tracking URI (None = no MLflow). experiment: MLflow experiment name.
    config_text: the study YAML as written, logged verbatim as an artifact.
    val_patch / val_overlap: sliding-window size (z, y, x) and overlap of validation (None = the
    training patch); a patch covering the whole volume makes validation one forward pass.
    stop_after: stop after this iteration with ``last.pt`` saved and no ``done.json`` (budgeted
    runs; tests of resumption). sleep_s: pause per iteration (tests of preemption).
    """

    study_root: str
    store: str
    member: MemberConfig
    training: TrainingConfig
    fold: int
    train_cases: list[str]
    val_cases: list[str]
    num_classes: int = 23
    mlflow_uri: str | None = None
    experiment: str = "sepnet"
    parent_run_id: str | None = None
    config_text: str | None = None
    study_name: str = "study"
    val_patch: list[int] | None = None
    val_overlap: float = 0.5
    stop_after: int | None = None
    sleep_s: float = 0.0
    extra_tags: dict[str, str] = field(default_factory=dict)
    threads: int | None = None  # torch intra-op threads (executor.cpus_per_task); None = SLURM's or torch's

    @property
    def out_dir(self) -> Path:
        return Path(self.study_root) / "models" / f"fold{self.fold}" / self.member.name

    @property
    def channels(self) -> list[str]:
        return [self.member.transform]

    @property
    def base(self) -> int:
        return self.member.base or self.training.base

    @property
    def run_key(self) -> str:
        return f"{self.study_name}/fold{self.fold}/{self.member.name}"

    @property
    def total_iterations(self) -> int:
        return self.training.epochs * self.training.iterations_per_epoch


# --------------------------------------------------------------------------- pieces

class _RangeSampler(torch.utils.data.Sampler):
    """Indices ``start, start+1, ..., stop-1``: restarts an epoch's patch stream mid-way."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def per_class_dice(pred: np.ndarray, ref: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Dice of every class 0..K-1 of two label maps, float64 (K,); NaN where both lack the class."""
    k = num_classes
    conf = np.bincount(ref.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel(), minlength=k * k)
    conf = conf.reshape(k, k)
    inter = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), np.nan)


def mean_foreground(dice: np.ndarray) -> float:
    """Mean Dice over foreground classes present (ignoring NaN); 0 when none is present."""
    fg = np.asarray(dice[1:], dtype=np.float64)
    fg = fg[~np.isnan(fg)]
    return float(fg.mean()) if fg.size else 0.0


def _predict_volume(model: torch.nn.Module, volume: torch.Tensor, *, num_classes: int, patch: list[int],
                    overlap: float, device: str, amp_dtype: torch.dtype | None) -> np.ndarray:
    """Label map uint8 (Z, Y, X) of a whole volume (C, Z, Y, X) float32 in [0, 1].

    Uses ``sepnet.core.inference.sliding_window`` when available, else one full-volume pass on
    the volume padded to a multiple of 8 (three 2x poolings).
    """
    def predictor(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with ctx:
            return model(x.to(device)).float()

    try:
        from sepnet.core.inference import sliding_window
    except ImportError:
        sliding_window = None
    with torch.no_grad():
        if sliding_window is not None:
            probs = sliding_window(volume, predictor, num_classes=num_classes, patch=tuple(patch), overlap=overlap,
                                   batch_size=2, device=device)
            return probs.argmax(0).cpu().numpy().astype(np.uint8)
        _, z, y, x = volume.shape
        pads = [(-n) % 8 for n in (z, y, x)]
        v = torch.nn.functional.pad(volume, (0, pads[2], 0, pads[1], 0, pads[0]))
        logits = predictor(v[None])[0, :, :z, :y, :x]
        return logits.argmax(0).cpu().numpy().astype(np.uint8)


def validate(model: torch.nn.Module, store: Any, case_ids: list[str], *, channels: list[str], num_classes: int,
             patch: list[int], overlap: float = 0.5, device: str = "cpu",
             amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Per-class Dice (K,) pooled over the validation cases' whole volumes (voxel counts summed)."""
    was_training = model.training
    model.eval()
    k = num_classes
    conf = np.zeros((k, k), dtype=np.int64)
    try:
        for cid in case_ids:
            image = torch.from_numpy(store.read_image(cid, channels))
            ref = store.read_label(cid)
            pred = _predict_volume(model, image, num_classes=k, patch=patch, overlap=overlap, device=device,
                                   amp_dtype=amp_dtype)
            conf += np.bincount(ref.astype(np.int64).ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)
    finally:
        model.train(was_training)
    inter = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), np.nan)


def _executor_job_id() -> str:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return "none"


def _jsonable_dice(d: np.ndarray) -> list[float | None]:
    return [None if math.isnan(float(v)) else float(v) for v in d]


class _Tracker:
    """MLflow from rank 0 only; metrics buffered and sent in batches. A tracking failure after the
    start is logged and does not stop training."""

    def __init__(self, spec: TrainSpec, *, enabled: bool):
        self.client = None
        self.run_id = None
        self._buf: list[Any] = []
        if not enabled or not spec.mlflow_uri:
            return
        from sepnet.jobs import tracking

        self.client = tracking.client(spec.mlflow_uri)
        exp = tracking.ensure_experiment(self.client, spec.experiment)
        tags = {
            "sepnet.fold": str(spec.fold), "sepnet.member": spec.member.name,
            "sepnet.executor_job_id": _executor_job_id(), **spec.extra_tags,
        }
        commit = tracking.git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["sepnet.git_commit"] = commit
        self.run_id = tracking.get_or_create_run(
            self.client, exp, key=spec.run_key, name=f"fold{spec.fold}/{spec.member.name}",
            parent_run_id=spec.parent_run_id, tags=tags,
        )
        tracking.log_params_flat(self.client, self.run_id, {
            "member": asdict(spec.member), "training": asdict(spec.training), "fold": spec.fold,
            "num_classes": spec.num_classes, "n_train_cases": len(spec.train_cases),
            "n_val_cases": len(spec.val_cases),
        })
        if spec.config_text:
            tracking.log_config_text(self.client, self.run_id, spec.config_text)

    def metric(self, key: str, value: float, step: int) -> None:
        if self.client is None or not math.isfinite(value):
            return
        from mlflow.entities import Metric

        self._buf.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._buf) >= 500:
            self.flush()

    def flush(self) -> None:
        if self.client is None or not self._buf:
            return
        try:
            for i in range(0, len(self._buf), 1000):
                self.client.log_batch(self.run_id, metrics=self._buf[i : i + 1000])
        except Exception as exc:  # noqa: BLE001 - tracking must not kill a long training
            log.warning("MLflow logging failed (%s); continuing", exc)
        self._buf = []

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.client is not None:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow set_terminated failed (%s)", exc)


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


def _train(spec: TrainSpec, env: ddp.DistEnv) -> dict[str, Any]:
    from sepnet.core.losses import build_loss
    from sepnet.core.networks import build, count_parameters
    from sepnet.data.sampler import PatchDataset
    from sepnet.data.store import Store

    t0 = time.time()
    tr = spec.training
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    device = env.device
    on_cuda = device.startswith("cuda")
    # Deterministic kernels where they exist (warn, do not fail, where they do not, e.g. some CUDA ops)
    if on_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    # the allocation, not the node's core count: several local jobs each using every core oversubscribe it
    if spec.threads:
        torch.set_num_threads(spec.threads)
    elif cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))
    store = Store(spec.store)
    model = build(spec.member.network, in_channels=len(spec.channels), num_classes=spec.num_classes,
                  base=spec.base, separable_axis=spec.member.separable_axis, seed=tr.seed).to(device)
    n_params = count_parameters(model)
    loss_fn = build_loss(spec.member.loss, alpha=spec.member.alpha)
    optimizer = torch.optim.Adam(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=tr.lr_step_epochs, gamma=tr.lr_decay)
    amp_dtype = None
    if on_cuda and tr.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # ---- resume
    step, best_score, best_dice, train_seconds, resumed_from = 0, -math.inf, None, 0.0, []
    last = out / LAST
    if last.is_file():
        state = ckpt.load(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best_score = int(state["step"]), float(state["best_score"])
        best_dice = state.get("best_dice")
        train_seconds = float(state.get("train_seconds", 0.0))
        resumed_from = list(state.get("resumed_from", [])) + [step]
        rngs = state["rng"]
        if len(rngs) == env.world_size:
            ckpt.set_rng_state(rngs[env.rank])
        else:  # a different world size cannot replay the same stream; keep going deterministically
            log.warning("checkpoint has %d RNG states for %d ranks: reseeding", len(rngs), env.world_size)
            torch.manual_seed(tr.seed * 1000 + env.rank + step)
        if env.is_main:
            log.info("resuming %s from iteration %d", out, step)
    else:
        # dropout masks differ per rank, reproducibly
        torch.manual_seed(tr.seed * 1000 + env.rank)
        if on_cuda:
            torch.cuda.manual_seed_all(tr.seed * 1000 + env.rank)

    net: torch.nn.Module = model
    if env.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if on_cuda else None)

    per_iter = tr.batch_size * tr.grad_accum  # samples per iteration per rank
    ipe = tr.iterations_per_epoch
    dataset = PatchDataset(store, spec.train_cases, channels=spec.channels, patch=tr.patch,
                           samples_per_epoch=ipe * per_iter, foreground_fraction=tr.foreground_fraction,
                           seed=tr.seed, rank=env.rank, world_size=env.world_size, pad=tr.pad)
    tracker = _Tracker(spec, enabled=env.is_main)
    total = spec.total_iterations
    stop_at = min(total, spec.stop_after) if spec.stop_after is not None else total
    last_val: np.ndarray | None = None

    def save_last() -> None:
        rngs = ddp.all_gather_object(ckpt.rng_state())  # every rank's, in rank order
        if env.is_main:
            ckpt.save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "epoch": step // ipe, "rng": rngs, "best_score": best_score, "best_dice": best_dice,
                "world_size": env.world_size, "train_seconds": train_seconds + (time.time() - t0),
                "resumed_from": resumed_from,
            }, last)
        ddp.barrier()

    net.train()
    # One loader for the whole run: with workers they persist, so their decompressed-case caches survive
    # epochs (the epoch reaches them through the dataset's shared memory). Its own generator: creating an
    # iterator must not draw from the global RNG (resume mid-epoch).
    range_sampler = _RangeSampler(0, ipe * per_iter)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tr.batch_size, sampler=range_sampler,
        num_workers=tr.num_workers, generator=torch.Generator().manual_seed(tr.seed),
        pin_memory=on_cuda, persistent_workers=tr.num_workers > 0,
    )
    while step < stop_at:
        epoch = step // ipe
        dataset.set_epoch(epoch)
        range_sampler.start = (step % ipe) * per_iter
        batches = iter(loader)
        for _ in range(step % ipe, ipe):
            loss_sum = 0.0
            for micro in range(tr.grad_accum):
                image, label = next(batches)
                image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
                sync = micro == tr.grad_accum - 1 or not env.distributed
                with (nullcontext() if sync else net.no_sync()):
                    ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
                    with ctx:
                        logits = net(image)
                    loss = loss_fn(logits.float(), label) / tr.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % ipe == 0:
                scheduler.step()
            mean_loss = ddp.all_reduce_mean(loss_sum)
            tracker.metric("train_loss", mean_loss, step)
            tracker.metric("lr", optimizer.param_groups[0]["lr"], step)
            if step % tr.val_every == 0 or step == total:
                if env.is_main and spec.val_cases:
                    last_val = validate(model, store, spec.val_cases, channels=spec.channels,
                                        num_classes=spec.num_classes, patch=spec.val_patch or tr.patch,
                                        overlap=spec.val_overlap, device=device, amp_dtype=amp_dtype)
                    score = mean_foreground(last_val)
                    tracker.metric("val_dice_mean_fg", score, step)
                    for c, d in enumerate(last_val):
                        if c and not math.isnan(d):
                            tracker.metric(f"val_dice_{c:02d}", float(d), step)
                    if score > best_score:
                        best_score, best_dice = score, _jsonable_dice(last_val)
                        ckpt.save_atomic({"model": model.state_dict(), "step": step, "score": score,
                                          "val_dice": best_dice, "spec": _model_spec(spec)}, out / BEST)
                best_score, best_dice = ddp.broadcast_object((best_score, best_dice))
                tracker.flush()
            if step % tr.checkpoint_every == 0 or step == stop_at:
                save_last()
                tracker.flush()
            if spec.sleep_s:
                time.sleep(spec.sleep_s)
            if step >= stop_at:
                break
        del batches
    del loader  # ends persistent workers

    if step < total:  # stopped early on purpose: resumable, not done
        tracker.flush()
        return {"stopped_at": step}
    if env.is_main:
        if not (out / BEST).exists():  # no validation case: the last weights are the model
            ckpt.save_atomic({"model": model.state_dict(), "step": step, "score": None, "val_dice": None,
                              "spec": _model_spec(spec)}, out / BEST)
        result = {
            "member": spec.member.name, "fold": spec.fold, "iterations": step, "params": n_params,
            "best_score": None if best_score == -math.inf else best_score, "val_dice": best_dice,
            "train_seconds": train_seconds + (time.time() - t0), "world_size": env.world_size,
            "resumed_from": resumed_from, "mlflow_run_id": tracker.run_id, "spec": _model_spec(spec),
        }
        from sepnet.jobs.study import atomic_write_json

        atomic_write_json(out / DONE, result)
        tracker.metric("train_seconds", result["train_seconds"], step)
        tracker.finish()
    ddp.barrier()
    return json.loads((out / DONE).read_text())


def _model_spec(spec: TrainSpec) -> dict[str, Any]:
    """What inference needs to rebuild the network without the study config."""
    return {"member": asdict(spec.member), "network": spec.member.network, "base": spec.base,
            "channels": spec.channels, "in_channels": len(spec.channels), "num_classes": spec.num_classes,
            "separable_axis": spec.member.separable_axis, "patch": list(spec.training.patch)}


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
        meta = store.meta(cid)
        if spec.member.transform not in store.channels(cid):
            raise SubmissionError(f"{spec.store}: case {cid!r} has no channel {spec.member.transform!r} "
                                  f"(stored: {', '.join(store.channels(cid))})")
        shape = tuple(meta.stored_shape)
        if not spec.training.pad and any(n < q for n, q in zip(shape, p)):
            raise SubmissionError(f"training.patch {p} is larger than case {cid!r} {list(shape)} (z, y, x) "
                                  "and training.pad is false")


# --------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML")
    p.add_argument("--member", required=True, help="member or baseline name from the config")
    p.add_argument("--fold", type=int, required=True, help="fold index")
    p.add_argument("--executor", choices=("debug", "local", "slurm"), help="override executor.kind")
    p.add_argument("--no-wait", action="store_true", help="submit and return (prints the job id)")


def make_spec(cfg: Any, *, member: str, fold: int) -> TrainSpec:
    """The TrainSpec of ``member`` x ``fold`` of a loaded study config (store must exist)."""
    from sepnet.data.store import Store
    from sepnet.jobs import tracking
    from sepnet.jobs.study import Layout, load_or_make_folds

    models = {m.name: m for m in cfg.models()}
    if member not in models:
        raise SubmissionError(f"{cfg.source_path or 'config'}: unknown member {member!r}; "
                              f"known: {', '.join(models) or '(none)'}")
    layout = Layout(Path(cfg.root))
    if not layout.store.is_dir():
        raise SubmissionError(f"{layout.store}: store not found; run `sepnet preprocess` or `sepnet cv` first")
    folds = load_or_make_folds(cfg, Store(layout.store).case_ids)
    if not 0 <= fold < len(folds):
        raise SubmissionError(f"--fold {fold}: the split has folds 0..{len(folds) - 1}")
    f = folds[fold]
    return TrainSpec(
        study_root=str(layout.root), store=str(layout.store), member=models[member],
        training=dataclasses.replace(cfg.training), fold=fold, train_cases=list(f["train"]),
        val_cases=list(f["val"]), mlflow_uri=tracking.resolve_uri(cfg),
        experiment=cfg.mlflow.experiment or cfg.name, config_text=cfg.source_text, study_name=cfg.name,
        val_patch=list(cfg.inference.patch) if cfg.inference.patch else None, val_overlap=cfg.inference.overlap,
        threads=cfg.executor.cpus_per_task,
    )


def run(args: argparse.Namespace) -> int:
    from sepnet.hpc.executors import make_executor, wait
    from sepnet.jobs.config import load_config

    cfg = load_config(args.config)
    if args.executor:
        cfg.executor = dataclasses.replace(cfg.executor, kind=args.executor)
    try:
        spec = make_spec(cfg, member=args.member, fold=args.fold)
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
