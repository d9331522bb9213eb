"""Submitting a study's job graph and following it to the end.

SLURM: one job array for every training still to do, one evaluation job per fold with
``--dependency=afterok`` on that fold's trainings, one report job after the evaluations; then
(unless detached) poll ``sacct`` until all have ended. Local/debug: the same graph run by a small
scheduler here, at most ``executor.array_parallelism`` jobs at a time, each fold's evaluation
starting as soon as its trainings are done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sepnet.core.errors import SubmissionError
from sepnet.jobs.config import StudyConfig
from sepnet.jobs.cv import PlannedJob
from sepnet.jobs.evaluate import EvalSpec, EvalTask
from sepnet.jobs.study import Layout, atomic_write_json, model_spec

log = logging.getLogger("sepnet.cv")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name)



def study_run_keys(cfg: StudyConfig, fold: int | None = None) -> str:
    return cfg.name if fold is None else f"{cfg.name}/fold{fold}"


def ensure_runs(cfg: StudyConfig, fold_ids: list[int]) -> dict[str, str | None]:
    """Parent run for the study and a child per fold (idempotent). Returns key -> run id."""
    from sepnet.jobs import tracking

    uri = tracking.resolve_uri(cfg)
    out: dict[str, str | None] = {}
    client = tracking.client(uri)
    exp = tracking.ensure_experiment(client, cfg.mlflow.experiment or cfg.name)
    tags = {"sepnet.study": cfg.name, "sepnet.executor": cfg.executor.kind, "sepnet.config_digest": cfg.digest()}
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    fp = Layout(Path(cfg.root)).store / "fingerprint.json"
    if fp.is_file():
        import hashlib

        tags["sepnet.data_fingerprint"] = hashlib.sha256(fp.read_bytes()).hexdigest()[:16]
    parent = tracking.get_or_create_run(client, exp, key=study_run_keys(cfg), name=cfg.name, tags=tags)
    tracking.log_params_flat(client, parent, cfg.to_dict())
    if cfg.source_text:
        tracking.log_config_text(client, parent, cfg.source_text)
    out[study_run_keys(cfg)] = parent
    for f in fold_ids:
        out[study_run_keys(cfg, f)] = tracking.get_or_create_run(
            client, exp, key=study_run_keys(cfg, f), name=f"fold{f}", parent_run_id=parent,
            tags={"sepnet.fold": str(f), **tags},
        )
    return out


def train_spec(cfg: StudyConfig, folds: list[dict], fold: int, model_name: str, parent_run_id: str | None):
    from sepnet.jobs import tracking
    from sepnet.jobs.train import TrainSpec

    layout = Layout(Path(cfg.root))
    member = {m.name: m for m in cfg.models()}[model_name]
    f = folds[fold]
    return TrainSpec(
        study_root=str(layout.root), store=str(layout.store), member=member,
        training=dataclasses.replace(cfg.training), fold=fold, train_cases=list(f["train"]),
        val_cases=list(f["val"]), mlflow_uri=tracking.resolve_uri(cfg),
        experiment=cfg.mlflow.experiment or cfg.name, parent_run_id=parent_run_id,
        config_text=cfg.source_text, study_name=cfg.name,
        val_patch=list(cfg.inference.patch) if cfg.inference.patch else None, val_overlap=cfg.inference.overlap,
        threads=cfg.executor.cpus_per_task,
    )


def eval_spec(cfg: StudyConfig, folds: list[dict], fold: int) -> EvalSpec:
    from sepnet.jobs import tracking

    layout = Layout(Path(cfg.root))
    return EvalSpec(
        study=cfg.name, study_root=str(layout.root), store=str(layout.store), fold=fold,
        test_cases=list(folds[fold]["test"]), models=[m.name for m in cfg.models()],
        members=[m.name for m in cfg.members], inference=asdict(cfg.inference), ensemble=asdict(cfg.ensemble),
        evaluation=asdict(cfg.evaluation), patch=list(cfg.training.patch), mlflow_uri=tracking.resolve_uri(cfg),
        experiment=cfg.mlflow.experiment or cfg.name, fold_run_key=study_run_keys(cfg, fold),
        threads=cfg.executor.cpus_per_task,
    )


class StudyRun:
    """The submitted (or to-be-run) graph; ``wait()`` follows it to the end."""

    def __init__(self, cfg: StudyConfig, planned: list[PlannedJob], tasks: dict[str, Any]):
        self.cfg = cfg
        self.layout = Layout(Path(cfg.root))
        self.planned = {j.name: j for j in planned}
        self.tasks = tasks  # name -> callable
        self.jobs: dict[str, Any] = {}  # name -> submitit job
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.t0 = time.time()

    # ------------------------------------------------------------------ bookkeeping
    def _record(self) -> None:
        data = {"jobs": {name: {"job_id": str(j.job_id), "executor": self.cfg.executor.kind,
                                "log": str(j.paths.stdout.parent)} for name, j in self.jobs.items()}}
        atomic_write_json(self.layout.jobs_file, data)

    def _progress(self, name: str, what: str) -> None:
        todo = [j for j in self.planned.values() if not j.done]
        finished = sum(1 for n in todo if n.name in self.finished)
        print(f"[{finished}/{len(todo)}] {time.time() - self.t0:7.0f}s  {name}: {what}", flush=True)

    @property
    def finished(self) -> set[str]:
        return getattr(self, "_finished", set())

    def _finish(self, name: str) -> None:
        s = self.finished
        s.add(name)
        self._finished = s

    def _executor(self, kind: str):
        from sepnet.hpc.executors import make_executor

        ex = self.cfg.executor
        if kind != "train":  # evaluation and report: one task; the report needs no GPU
            ex = dataclasses.replace(ex, nodes=1, tasks_per_node=1,
                                     gpus_per_node=0 if kind == "report" else min(ex.gpus_per_node, 1))
        return make_executor(ex, folder=self.layout.logs, name=f"{_safe(self.cfg.name)}-{kind}")

    # ------------------------------------------------------------------ SLURM: queue everything now
    def submit_slurm(self) -> None:
        from sepnet.hpc.executors import submit_after, submit_tasks

        todo = [j for j in self.planned.values() if not j.done]
        trains = [j for j in todo if j.kind == "train"]
        ex = self._executor("train")
        # the task objects themselves (not a wrapper) so that submitit can requeue them on preemption
        for j, job in zip(trains, submit_tasks(ex, [self.tasks[j.name] for j in trains])):
            self.jobs[j.name] = job
        exe = self._executor("evaluate")
        for j in [j for j in todo if j.kind == "evaluate"]:
            after = [self.jobs[a] for a in j.after if a in self.jobs]
            self.jobs[j.name] = submit_after(exe, self.tasks[j.name], after=after)
        rep = self.planned["report"]
        if not rep.done:
            after = [self.jobs[a] for a in rep.after if a in self.jobs]
            self.jobs["report"] = submit_after(self._executor("report"), self.tasks["report"], after=after)
        self._record()
        for name, job in self.jobs.items():
            self._progress(name, f"submitted as SLURM job {job.job_id}")

    def wait_slurm(self) -> bool:
        pending = dict(self.jobs)
        while pending:
            try:
                next(iter(pending.values())).watcher.update()
            except Exception:  # noqa: BLE001 - a sacct hiccup: next round
                pass
            for name, job in list(pending.items()):
                state = str(job.state).upper()
                if job.done():
                    del pending[name]
                    try:
                        job.results()
                        self._finish(name)
                        self._progress(name, "done")
                    except Exception as e:  # noqa: BLE001
                        self.failed[name] = f"{state}: {_last_line(e)} (logs: {job.paths.stdout.parent})"
                        self._finish(name)
                        self._progress(name, f"FAILED ({state})")
                elif "DEPENDENCY" in state or state.startswith("CANCELLED"):
                    # afterok can never be met once a dependency failed: SLURM keeps it pending forever
                    reason = _squeue_reason(job.job_id)
                    if "DependencyNeverSatisfied" in reason:
                        job.cancel(check=False)
                        del pending[name]
                        self.skipped[name] = "a job it depends on failed"
                        self._progress(name, "skipped (dependency failed)")
            if pending:
                time.sleep(5)
        return not self.failed and not self.skipped

    # ------------------------------------------------------------------ local / debug: schedule here
    def run_local(self) -> bool:
        todo = [j for j in self.planned.values() if not j.done]
        if not todo:
            return True
        kind = self.cfg.executor.kind
        parallel = max(1, self.cfg.executor.array_parallelism) if kind == "local" else 1
        done = {j.name for j in self.planned.values() if j.done}
        waiting = list(todo)
        running: dict[str, Any] = {}
        executors = {k: self._executor(k) for k in ("train", "evaluate", "report")}
        while waiting or running:
            # start what is ready
            for j in list(waiting):
                if len(running) >= parallel:
                    break
                deps = [a for a in j.after if a in self.planned]
                if any(a in self.failed or a in self.skipped for a in deps):
                    waiting.remove(j)
                    self.skipped[j.name] = "a job it depends on failed"
                    self._finish(j.name)
                    self._progress(j.name, "skipped (dependency failed)")
                    continue
                if all(a in done for a in deps):
                    waiting.remove(j)
                    job = executors[j.kind].submit(self.tasks[j.name])
                    self.jobs[j.name] = job
                    running[j.name] = job
                    self._record()
                    if kind == "debug":  # runs in this process when asked
                        self._progress(j.name, "running in-process")
                    else:
                        self._progress(j.name, f"started (pid {job.job_id})")
            # collect what finished
            for name, job in list(running.items()):
                if kind != "debug" and not job.done():
                    continue
                del running[name]
                self._finish(name)
                try:
                    job.results()
                    done.add(name)
                    self._progress(name, "done")
                except Exception as e:  # noqa: BLE001 - a failed job is reported, the rest go on
                    self.failed[name] = f"{_last_line(e)} (logs: {job.paths.stdout.parent})"
                    self._progress(name, "FAILED")
            if running and kind != "debug":
                time.sleep(1.0)
            if not running and waiting and not any(
                all(a in done for a in j.after if a in self.planned) for j in waiting
            ) and not any(a in self.failed or a in self.skipped for j in waiting for a in j.after):
                raise SubmissionError("job graph cannot progress (a dependency is neither done nor planned)")
        return not self.failed and not self.skipped

    def wait(self) -> bool:
        if self.cfg.executor.kind == "slurm":
            return self.wait_slurm()  # Ctrl-C stops following; the queued jobs go on (`sepnet status`)
        try:
            return self.run_local()
        except KeyboardInterrupt:
            # local jobs are children of this shell session: stop them rather than leave orphans writing
            for name, job in self.jobs.items():
                if name not in self.finished:
                    try:
                        job.cancel(check=False)
                    except Exception:  # noqa: BLE001 - best effort on the way out
                        pass
            raise

    def failure_summary(self) -> str:
        lines = [f"FAILED {n}: {m}" for n, m in self.failed.items()]
        lines += [f"skipped {n}: {m}" for n, m in self.skipped.items()]
        return "\n".join(lines)


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _squeue_reason(job_id: str) -> str:
    import subprocess

    try:
        return subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%r"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def submit_study(cfg: StudyConfig, folds: list[dict], fold_ids: list[int], planned: list[PlannedJob]) -> StudyRun:
    """Create MLflow runs, write each model's spec.json, check and build the tasks; submit on SLURM."""
    from sepnet.jobs.report import ReportTask
    from sepnet.jobs.train import TrainTask, check_spec

    layout = Layout(Path(cfg.root))
    runs = ensure_runs(cfg, fold_ids)
    tasks: dict[str, Any] = {}
    for j in planned:
        if j.kind == "train":
            spec = train_spec(cfg, folds, j.fold, j.model, runs.get(study_run_keys(cfg, j.fold)))
            member = {m.name: m for m in cfg.models()}[j.model]
            atomic_write_json(layout.model_dir(j.fold, j.model) / "spec.json", model_spec(cfg, member))
            if not j.done:
                check_spec(spec)
            tasks[j.name] = TrainTask(spec)
        elif j.kind == "evaluate":
            tasks[j.name] = EvalTask(eval_spec(cfg, folds, j.fold))
        else:
            tasks[j.name] = ReportTask(cfg=cfg, fold_ids=fold_ids, parent_run_id=runs.get(study_run_keys(cfg)))
    run = StudyRun(cfg, planned, tasks)
    if cfg.executor.kind == "slurm":
        run.submit_slurm()
    return run


__all__ = ["StudyRun", "submit_study", "ensure_runs", "json"]
