"""A study's job graph: which jobs, on which executor, in which order; run by ``sepnet.hpc.scheduling``.

The graph: the preprocessing shards, one training per fold x model still to do (after every shard),
one evaluation per fold after that fold's trainings (``evaluation.fan_out``: one infer job per fold x
model after its training, all on the evaluate stage's resources, and one fuse job per fold after the
fold's infer jobs), one report after the evaluations (or fusions). Each stage runs
on its own executor (``jobs.config.stage_executor``: the top level, the stage's defaults, then
``executor.stages.<stage>``), every one built and checked (``sinfo``) before anything is queued.
SLURM: everything is queued at once (the shards as one job array, the trainings as another with
``afterok`` on the shards, a fold's infer jobs as one array with ``afterok`` on that fold's trainings)
and followed with ``sacct`` until all have ended. Local/debug: the
scheduler runs it here, at most ``executor.array_parallelism`` jobs at a time, each fold's
evaluation starting as soon as its trainings are done. Every submitted job is recorded in
``jobs.json`` (``sepnet status``).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from sepnet.hpc.atomic import atomic_write_json
from sepnet.hpc.scheduling import GraphJob, GraphRun, follow_slurm, run_graph, submit_graph_slurm
from sepnet.jobs.config import StudyConfig
from sepnet.jobs.cv import PlannedJob
from sepnet.jobs.evaluate import EvalTask, InferTask, make_eval_spec
from sepnet.jobs.study import Layout

log = logging.getLogger("sepnet.cv")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name)


def study_run_keys(cfg: StudyConfig, fold: int | None = None) -> str:
    """The MLflow run key of the study (fold None) or of one fold."""
    return cfg.name if fold is None else f"{cfg.name}/fold{fold}"


def ensure_runs(cfg: StudyConfig, fold_ids: list[int], folds: list[dict] | None = None, *,
                reopen: bool = True) -> dict[str, str | None]:
    """Parent run for the study and a child per fold (idempotent); each fold run holds its split
    (``folds[f]``: train/val/test case ids) as params and ``split.json``. ``reopen`` false: finished
    runs stay finished (a rerun with nothing left to do). Returns key -> run id."""
    import hashlib

    from sepnet.jobs import tracking

    client = tracking.client(tracking.resolve_uri(cfg))
    exp = tracking.ensure_experiment(client, cfg.mlflow.experiment or cfg.name)
    tags = {"sepnet.study": cfg.name, "sepnet.executor": cfg.executor.kind, "sepnet.config_digest": cfg.digest()}
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    fp = Layout(Path(cfg.root)).store / "fingerprint.json"
    if fp.is_file():
        tags["sepnet.data_fingerprint"] = hashlib.sha256(fp.read_bytes()).hexdigest()[:16]
    parent = tracking.get_or_create_run(client, exp, key=study_run_keys(cfg), name=cfg.name, tags=tags,
                                        reopen=reopen)
    try:
        tracking.log_params_flat(client, parent, cfg.to_dict())
    except Exception as e:  # noqa: BLE001 - MLflow keeps a param's first value (e.g. root of a moved study)
        log.warning("study run: config params kept from the first run (%s)", str(e).splitlines()[0][:300])
    if cfg.source_text:
        tracking.log_config_text(client, parent, cfg.source_text)
    out: dict[str, str | None] = {study_run_keys(cfg): parent}
    for f in fold_ids:
        run_id = out[study_run_keys(cfg, f)] = tracking.get_or_create_run(
            client, exp, key=study_run_keys(cfg, f), name=f"fold{f}", parent_run_id=parent,
            tags={"sepnet.fold": str(f), **tags}, reopen=reopen,
        )
        if folds is not None and f < len(folds):
            _log_split(client, run_id, f, folds[f])
    return out


def _log_split(client: Any, run_id: str, fold: int, split: dict) -> None:
    """A fold run's case ids: ``split.n_<part>`` and ``split.<part>`` (comma-separated, cut at MLflow's
    param limit) params, the full lists in ``split.json``."""
    from sepnet.jobs import tracking

    parts = {part: [str(c) for c in split.get(part) or []] for part in ("train", "val", "test")}
    params = {"split": {**{f"n_{p}": len(ids) for p, ids in parts.items()},
                        **{p: ",".join(ids) for p, ids in parts.items()}}}
    try:
        tracking.log_params_flat(client, run_id, params)
    except Exception as e:  # noqa: BLE001 - MLflow keeps a param's first value; the split is in folds.json
        log.warning("fold %d: MLflow split params not logged (%s)", fold, e)
    client.log_dict(run_id, {"fold": fold, **parts}, "split.json")


class StudyRun:
    """The study's graph of jobs still to do; ``wait()`` runs (local/debug) or follows (SLURM) it to the end."""

    def __init__(self, cfg: StudyConfig, planned: list[PlannedJob], tasks: dict[str, Any]):
        self.cfg = cfg
        self.layout = Layout(Path(cfg.root))
        self.planned = {j.name: j for j in planned}
        # training's request (the top level the user wrote) is checked first, so a request that fits no node
        # is reported in the user's numbers, not in a derived stage's
        kinds = sorted({j.kind for j in planned if not j.done}, key=lambda k: (k != "train", k))
        executors = {kind: self._executor(kind) for kind in kinds}
        self.graph = [GraphJob(j.name, tasks[j.name], executors[j.kind], after=[a for a in j.after
                                                                             if not self.planned[a].done])
                      for j in planned if not j.done]
        self.jobs: dict[str, Any] = {}  # name -> submitit job, as recorded in jobs.json
        self.result = GraphRun()
        self.t0 = time.time()

    def _executor(self, stage: str) -> Any:
        from sepnet.hpc.executors import make_executor
        from sepnet.jobs.config import stage_executor

        where = f"executor.stages.{stage}" if stage in self.cfg.executor.stages else \
            ("executor" if stage == "train" else f"executor (as the {stage} stage's defaults)")
        return make_executor(stage_executor(self.cfg.executor, stage), folder=self.layout.logs,
                             name=f"{_safe(self.cfg.name)}-{stage}", where=where)

    def _record(self, name: str, job: Any) -> None:
        self.jobs[name] = job
        data = {"jobs": {n: {"job_id": str(j.job_id), "executor": self.cfg.executor.kind,
                             "log": str(j.paths.stdout.parent), "stdout": str(j.paths.stdout),
                             "stderr": str(j.paths.stderr)} for n, j in self.jobs.items()}}
        atomic_write_json(self.layout.jobs_file, data)

    def _progress(self, name: str, what: str, finished: int) -> None:
        print(f"[{finished}/{len(self.graph)}] {time.time() - self.t0:7.0f}s  {name}: {what}", flush=True)

    def submit_slurm(self) -> None:
        """Queue the whole graph on SLURM now (jobs of one stage with the same dependencies as one array)."""
        for name, job in submit_graph_slurm(self.graph, on_submit=self._record).items():
            self._progress(name, f"submitted as SLURM job {job.job_id}", 0)

    def wait(self) -> bool:
        """Run or follow the graph to the end; True when every job succeeded."""
        ex = self.cfg.executor
        if ex.kind == "slurm":  # Ctrl-C stops following; the queued jobs go on (`sepnet status`)
            self.result = follow_slurm(self.jobs, on_event=self._progress)
        else:
            self.result = run_graph(self.graph, parallel=ex.array_parallelism if ex.kind == "local" else 1,
                                    in_process=ex.kind == "debug", on_event=self._progress, on_submit=self._record)
        return self.result.ok

    def failure_summary(self) -> str:
        return self.result.summary()


def submit_study(cfg: StudyConfig, folds: list[dict], fold_ids: list[int], planned: list[PlannedJob]) -> StudyRun:
    """Create MLflow runs, check and build the tasks of ``planned``; submit them at once on SLURM."""
    from sepnet.jobs.preprocess import PreprocessTask
    from sepnet.jobs.report import ReportTask
    from sepnet.jobs.train import TrainTask, check_spec, train_spec

    runs = ensure_runs(cfg, fold_ids, folds, reopen=not all(j.done for j in planned))
    tasks: dict[str, Any] = {}
    shards = [j for j in planned if j.kind == "preprocess"]
    data_ready = all(j.done for j in shards)
    for j in planned:
        if j.kind == "preprocess":
            tasks[j.name] = PreprocessTask(cfg, store=str(Layout(Path(cfg.root)).store), shard=shards.index(j),
                                           shards=len(shards))
        elif j.kind == "train":
            spec = train_spec(cfg, model=j.model, fold=j.fold, folds=folds,
                              parent_run_id=runs.get(study_run_keys(cfg, j.fold)))
            if not j.done and data_ready:  # else the store is filled by the preprocess jobs first
                check_spec(spec)
            tasks[j.name] = TrainTask(spec)
        elif j.job == "infer":
            tasks[j.name] = InferTask(make_eval_spec(cfg, folds, j.fold), model=j.model)
        elif j.kind == "evaluate":  # evaluate/fold<F>, or fuse/fold<F> (EvalTask on the saved outputs)
            tasks[j.name] = EvalTask(make_eval_spec(cfg, folds, j.fold))
        else:
            tasks[j.name] = ReportTask(cfg=cfg, fold_ids=fold_ids, parent_run_id=runs.get(study_run_keys(cfg)))
    run = StudyRun(cfg, planned, tasks)
    if cfg.executor.kind == "slurm":
        run.submit_slurm()
    return run


__all__ = ["StudyRun", "submit_study", "ensure_runs", "study_run_keys"]
