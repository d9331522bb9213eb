"""``sepnet cv CONFIG``: a whole cross-validated study on any executor, resumable.

The job graph, one stage after the other, each stage with its own resources (``executor.stages``):
preprocess (phantom generation and preprocessing, ``executor.stages.preprocess.array`` shards of the
cases, all writing into the one store) -> training (folds x members x baselines, after every shard)
-> per-fold evaluation + ensemble (after that fold's trainings) -> the cross-fold report. This
process does no heavy work (on a cluster it runs on the login node): it lists the datasets' cases,
makes the fold split from those ids (no store needed, so the trainings can be queued at once),
creates the empty store folder and submits. A rerun skips every finished piece (an up-to-date store,
trained models with ``done.json``, evaluated folds, the report) and resubmits what failed or is
missing; MLflow runs are looked up by key, never duplicated. The resolved config (after ``--set``
overrides) is written to ``<root>/study.yaml`` before anything is submitted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sepnet.core.errors import ConfigError, DataError
from sepnet.hpc.atomic import atomic_write_json, atomic_write_text
from sepnet.jobs.config import StudyConfig, dump_config, load_config
from sepnet.jobs.study import Layout, load_or_make_folds, selected_folds

log = logging.getLogger("sepnet.cv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML (see configs/quickstart.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the job graph and resource totals, run nothing")
    p.add_argument("--detach", action="store_true", help="submit and return at once; see `sepnet status STUDY`")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.epochs=2 (YAML value)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------- plan

@dataclass
class PlannedJob:
    kind: str  # a stage: preprocess | train | evaluate | report (``jobs.config.STAGES``)
    name: str
    fold: int | None = None
    model: str | None = None
    done: bool = False
    after: list[str] = field(default_factory=list)

    @property
    def job(self) -> str:
        """What the job does, the first part of its name: preprocess, train, evaluate, report, and with
        ``evaluation.fan_out`` infer and fuse (both of the evaluate stage)."""
        return self.name.split("/")[0]


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DataError(f"{root}: study folder is not writable ({e.strerror})") from None


def plan_jobs(cfg: StudyConfig, folds: list[dict], fold_ids: list[int], *, shards: int = 1,
              data_ready: bool = True) -> list[PlannedJob]:
    """The study's jobs in graph order. shards: preprocessing jobs; data_ready: the store is up to date.
    ``evaluation.fan_out``: per fold an ``infer/fold<F>/<model>`` job after each training and a
    ``fuse/fold<F>`` after those, instead of ``evaluate/fold<F>``."""
    from sepnet.jobs.evaluate import outputs_dir

    layout = Layout(Path(cfg.root))
    jobs = [PlannedJob("preprocess", f"preprocess/shard{i}", done=data_ready) for i in range(shards)]
    pre = [j.name for j in jobs]
    for f in fold_ids:
        names = []
        for m in cfg.models():
            name = f"train/fold{f}/{m.name}"
            names.append(name)
            jobs.append(PlannedJob("train", name, fold=f, model=m.name, done=layout.trained(f, m.name),
                                   after=list(pre)))
        evaluated = layout.evaluated(f)
        if cfg.evaluation.fan_out:  # one job per model, all after the fold's trainings: one SLURM array
            infer = [PlannedJob("evaluate", f"infer/fold{f}/{m.name}", fold=f, model=m.name, after=list(names),
                                done=evaluated or (outputs_dir(layout.eval_dir(f), m.name) / "done.json").is_file())
                     for m in cfg.models()]
            jobs += infer
            names = [j.name for j in infer]
        jobs.append(PlannedJob("evaluate", f"{'fuse' if cfg.evaluation.fan_out else 'evaluate'}/fold{f}", fold=f,
                               done=evaluated, after=names))
    jobs.append(
        PlannedJob(
            "report", "report", done=layout.reported() and all(j.done for j in jobs),
            after=[j.name for j in jobs if j.job in ("evaluate", "fuse")],
        )
    )
    return jobs


def stage_totals(cfg: StudyConfig, jobs: list[PlannedJob]) -> dict[str, dict[str, float]]:
    """Per stage: jobs to run and their CPU-h and GPU-h at most (each job at its full wall-clock limit):
    ``jobs x nodes x tasks_per_node x cpus_per_task x time_min / 60`` CPU-h, ``jobs x nodes x gpus_per_node
    x time_min / 60`` GPU-h, with the stage's resolved resources."""
    from sepnet.jobs.config import STAGES, stage_executor

    out = {}
    for stage in STAGES:
        n = sum(1 for j in jobs if j.kind == stage and not j.done)
        ex = stage_executor(cfg.executor, stage)
        hours = n * ex.nodes * ex.time_min / 60
        out[stage] = {"jobs": n, "cpu_h": hours * ex.tasks_per_node * ex.cpus_per_task,
                      "gpu_h": hours * ex.gpus_per_node}
    return out


def _resources(ex) -> str:
    return (f"{ex.nodes} node(s) x {ex.tasks_per_node} task(s) x {ex.cpus_per_task} CPU(s), {ex.gpus_per_node} GPU(s)"
            + (f"/node, {ex.mem_gb:g} GB" if ex.mem_gb else "/node") + f", {ex.time_min} min"
            + (f", partition {ex.partition}" if ex.partition else ""))


def describe_plan(cfg: StudyConfig, folds: list[dict], fold_ids: list[int], jobs: list[PlannedJob]) -> str:
    """The per-stage job graph (done/todo, dependencies, each stage's resources) and the resource totals."""
    from sepnet.jobs.config import STAGES, stage_executor

    ex = cfg.executor
    lines = [f"study {cfg.name} -> {cfg.root}", f"executor: {ex.kind}" + (f" (partition {ex.partition})"
                                                                          if ex.partition else "")]
    pre = [j for j in jobs if j.kind == "preprocess"]
    lines.append(f"[{'done' if all(j.done for j in pre) else 'todo'}] preprocess: {len(pre)} job(s)"
                 + (" (array)" if len(pre) > 1 else ""))
    for f in fold_ids:
        fd = folds[f]
        lines.append(f"fold {f}: train {len(fd['train'])}, val {len(fd['val'])}, test {len(fd['test'])} cases")
        for j in jobs:
            if j.fold == f:
                lines.append(f"  [{'done' if j.done else 'todo'}] {j.name}" + (
                    f"  (after {len(j.after)} trainings)" if j.job in ("evaluate", "infer") else
                    f"  (after {len(j.after)} infer jobs)" if j.job == "fuse" else
                    f"  (after {len(j.after)} preprocess job(s))" if j.after else ""))
    rep = jobs[-1]
    lines.append(f"[{'done' if rep.done else 'todo'}] report  (after {len(rep.after)} evaluations)")
    totals = stage_totals(cfg, jobs)
    lines.append(f"{'stage':<12} {'jobs':>4}  {'resources per job':<76} {'CPU-h':>8} {'GPU-h':>8}")
    for stage in STAGES:
        t = totals[stage]
        lines.append(f"{stage:<12} {t['jobs']:>4}  {_resources(stage_executor(ex, stage)):<76} "
                     f"{t['cpu_h']:>8.2f} {t['gpu_h']:>8.2f}")
    n = sum(t["jobs"] for t in totals.values())
    lines.append(f"{'total':<12} {n:>4}  {'(at most: every job at its full time limit)':<76} "
                 f"{sum(t['cpu_h'] for t in totals.values()):>8.2f} {sum(t['gpu_h'] for t in totals.values()):>8.2f}")
    lines.append(f"{totals['train']['jobs']} training jobs to run; array parallelism {ex.array_parallelism}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data

def study_graph(cfg: StudyConfig, *, dry_run: bool = False) -> tuple[list[dict], list[int], list[PlannedJob]]:
    """Folds (from the datasets' listed case ids) and the planned jobs; a dry run writes nothing (no
    folds.json)."""
    from sepnet.jobs.preprocess import data_ready, shard_count, study_cases
    from sepnet.jobs.study import make_folds

    layout = Layout(Path(cfg.root))
    case_ids = [cid for _, cid in study_cases(cfg)]
    if not dry_run or layout.folds_file.exists() or cfg.folds.split_file:
        folds = load_or_make_folds(cfg, case_ids)
    else:
        folds = make_folds(case_ids, k=cfg.folds.k, seed=cfg.folds.seed, val_fraction=cfg.folds.val_fraction)
    fold_ids = selected_folds(cfg, folds)
    ready = layout.store.is_dir() and data_ready(cfg, layout.store)
    return folds, fold_ids, plan_jobs(cfg, folds, fold_ids, shards=shard_count(cfg, len(case_ids)), data_ready=ready)


# --------------------------------------------------------------------------- run

def _spawn_detached(args: argparse.Namespace, layout: Layout) -> int:
    """Local/debug executors: run the whole study as a background process that outlives this shell."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    log_path = layout.logs / "cv.log"
    cmd = [sys.executable, "-m", "sepnet.jobs.cli", "cv", str(Path(args.config).resolve())]
    for o in args.overrides:
        cmd += ["--set", o]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    atomic_write_json(layout.jobs_file, {"controller_pid": proc.pid, "log": str(log_path), "jobs": {}})
    print(f"study running in the background (pid {proc.pid}); log: {log_path}")
    print(f"progress: sepnet status {layout.root}")
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
    layout = Layout(Path(cfg.root))

    if args.dry_run:
        print(describe_plan(cfg, *study_graph(cfg, dry_run=True)))
        return 0

    check_writable(layout.root)
    for ds in cfg.datasets:
        if ds.phantom is None and not Path(ds.path).exists():
            raise DataError(f"{ds.path}: dataset folder does not exist")
    atomic_write_text(layout.resolved_config, dump_config(cfg))  # before anything is submitted
    if args.detach and cfg.executor.kind != "slurm":
        return _spawn_detached(args, layout)

    t0 = time.time()
    from sepnet.data.preprocess import init_store

    folds, fold_ids, jobs = study_graph(cfg)
    init_store(layout.store)  # before the shards start: they only add cases
    print(describe_plan(cfg, folds, fold_ids, jobs), flush=True)

    from sepnet.jobs.orchestrate import submit_study

    handles = submit_study(cfg, folds, fold_ids, jobs)
    if args.detach:
        print(f"submitted; progress: sepnet status {layout.root}")
        return 0
    ok = handles.wait()
    if not ok:
        print(handles.failure_summary(), file=sys.stderr)
        print(f"some jobs failed; fix and rerun `sepnet cv {shlex.quote(args.config)}` to resume", file=sys.stderr)
        return 1
    print(f"study finished in {(time.time() - t0) / 60:.1f} min")
    print(f"report: {layout.report / 'report.md'}")
    from sepnet.jobs.tracking import resolve_uri, ui_hint

    print(ui_hint(resolve_uri(cfg), cfg.mlflow.experiment or cfg.name))  # the runs page, not GenAI traces
    return 0
