"""MLflow helpers: where runs go, and idempotent run creation so reruns never duplicate runs.

A study is one experiment; each trained model (member x fold) is one run, found again on rerun by
its tag ``sepnet.key``; a parent run (the study / the fold) holds children via ``mlflow.parentRunId``.
All functions take an explicit ``MlflowClient``: nothing touches MLflow's global active run.

MLflow 3's UI opens an experiment on its GenAI traces page unless the experiment tag
``mlflow.experimentKind`` says ``custom_model_development``: ``ensure_experiment`` sets it, and
``runs_url`` gives the runs page (``<server>/#/experiments/<id>/runs``, a hash route of the UI).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sepnet.jobs.config import StudyConfig, flatten

log = logging.getLogger(__name__)

KEY_TAG = "sepnet.key"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what MLflow 3's UI reads to choose the runs view
EXPERIMENT_KIND = "custom_model_development"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value (characters)
_BATCH = 100  # MLflow's limit on params per log_batch call


def resolve_uri(cfg: StudyConfig) -> str:
    """``mlflow.tracking_uri`` of the config, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<study root>/mlflow.db`` (MLflow 3 refuses a plain file store by default)."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(cfg.root).resolve() / 'mlflow.db'}"


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (imported lazily: mlflow takes seconds to import)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def default_artifact_location(uri: str) -> str | None:
    """``mlartifacts/`` beside a sqlite database, so artifacts never land in the working directory
    (MLflow's default ``./mlruns``); None for servers, which choose their own."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client: Any, name: str, *, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (restored if deleted), tagged as a
    machine-learning experiment (``mlflow.experimentKind``) so the UI opens it on its runs."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    if artifact_location is None:
        artifact_location = default_artifact_location(client.tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 - another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def runs_url(uri: str, experiment_id: str) -> str:
    """The UI's runs page of an experiment: on the server of an http(s) ``uri``, else where
    ``mlflow ui --backend-store-uri <uri>`` serves by default (``UI_ADDRESS``)."""
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs"


def ui_hint(uri: str, experiment: str) -> str:
    """One line telling a user where to browse the study's runs (the experiment looked up by name;
    for a local store, the ``mlflow ui`` command to start first)."""
    exp = client(uri).get_experiment_by_name(experiment)
    if exp is None:
        return f"MLflow: no experiment {experiment!r} in {uri}"
    url = runs_url(uri, exp.experiment_id)
    if urlparse(uri).scheme in ("http", "https"):
        return f"MLflow runs: {url}"
    return f"MLflow: mlflow ui --backend-store-uri {uri}  then open {url}"


def quote(value: str) -> str:
    """``value`` as a single-quoted string literal of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_run(client: Any, experiment_id: str, key: str) -> str | None:
    """The run id tagged ``sepnet.key = key`` (the oldest if several), or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{quote(key)}'", max_results=10,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0].info.run_id if runs else None


def get_or_create_run(
    client: Any, experiment_id: str, *, key: str, name: str, parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, reopen: bool = True,
) -> str:
    """The run for ``key``: found by its ``sepnet.key`` tag, else created (and tagged). Tags are
    (re)set either way, so a resumed job updates e.g. its executor job id. ``reopen``: a finished run
    found is set RUNNING again (a resumed job); False leaves its status and end time alone (later
    results logged to a finished run, e.g. evaluation's test metrics)."""
    run_id = find_run(client, experiment_id, key)
    all_tags = {KEY_TAG: key, "mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_id is None:
        run = client.create_run(experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    if reopen and client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    return run_id


def log_params_flat(client: Any, run_id: str, params: dict[str, Any]) -> dict[str, str]:
    """Log nested ``params`` as dotted keys (``training.lr``), values cut to 6000 characters, in
    batches. Params already logged with the same value are skipped, so a rerun can call it again.
    Returns what was logged."""
    from mlflow.entities import Param

    flat = flatten(params)
    flat = {k: (v if len(v) <= PARAM_VALUE_LIMIT else v[: PARAM_VALUE_LIMIT - 3] + "...") for k, v in flat.items()}
    have = client.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in flat.items() if have.get(k) != v]
    for i in range(0, len(todo), _BATCH):
        client.log_batch(run_id, params=todo[i : i + _BATCH])
    return flat


def log_config_text(client: Any, run_id: str, text: str, *, name: str = "config.yaml") -> None:
    """Store the config exactly as written (an artifact ``name``)."""
    client.log_text(run_id, text, name)


def git_commit(path: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the sepnet source tree (or ``path``), None outside a git checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


class RunTracker:
    """One MLflow run fed by a long job: metrics buffered and sent in batches.

    Disabled (every call a no-op) when ``uri`` is None or ``enabled`` is false (DDP ranks other than 0).
    The run is found again by ``key`` (a resumed job continues its run). A tracking failure after the
    start is logged and does not stop the job. ``system_metrics``: MLflow's monitor samples CPU,
    memory, disk, network (and NVIDIA GPUs when ``pynvml`` is installed) every
    ``system_metrics_interval`` seconds as ``system/*`` metrics, plus one last sample at ``finish``;
    skipped with a warning when ``psutil`` is missing.
    """

    BUFFER = 500  # metrics kept before a flush
    _LOG_BATCH = 1000  # MLflow's limit on metrics per log_batch call

    def __init__(self, uri: str | None, *, enabled: bool, experiment: str, key: str, name: str,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None, config_text: str | None = None,
                 system_metrics: bool = False, system_metrics_interval: float = 10.0):
        self.client: Any = None
        self.run_id: str | None = None
        self._buf: list[Any] = []
        self._monitor: Any = None
        if not enabled or not uri:
            return
        self.client = client(uri)
        exp = ensure_experiment(self.client, experiment)
        tags = dict(tags or {})
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["sepnet.git_commit"] = commit
        self.run_id = get_or_create_run(self.client, exp, key=key, name=name, parent_run_id=parent_run_id,
                                        tags=tags)
        if params:
            log_params_flat(self.client, self.run_id, params)
        if config_text:
            log_config_text(self.client, self.run_id, config_text)
        if system_metrics:
            self._monitor = _system_monitor(uri, self.run_id, interval=system_metrics_interval)

    def metric(self, key: str, value: float, step: int) -> None:
        """Buffer one metric value (non-finite values are dropped)."""
        if self.client is None or not math.isfinite(value):
            return
        from mlflow.entities import Metric

        self._buf.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._buf) >= self.BUFFER:
            self.flush()

    def flush(self) -> None:
        if self.client is None or not self._buf:
            return
        try:
            for i in range(0, len(self._buf), self._LOG_BATCH):
                self.client.log_batch(self.run_id, metrics=self._buf[i : i + self._LOG_BATCH])
        except Exception as exc:  # noqa: BLE001 - tracking must not kill a long training
            log.warning("MLflow logging failed (%s); continuing", exc)
        self._buf = []

    def log_files(self, paths: list[Path], artifact_path: str) -> None:
        """Upload existing files into the run's artifact folder ``artifact_path``."""
        if self.client is None:
            return
        try:
            for path in paths:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001 - the files on disk are what matters
            log.warning("MLflow artifact upload failed (%s); continuing", exc)

    def stop_system_metrics(self) -> None:
        """One last sample, flushed, then the monitor thread ends (a short job still gets one point)."""
        mon, self._monitor = self._monitor, None
        if mon is None:
            return
        try:
            mon._shutdown_event.set()  # the loop exits without publishing what it holds
            if mon._process is not None:
                mon._process.join()
            mon.collect_metrics()
            mon.publish_metrics(mon.aggregate_metrics())
            mon.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow system metrics failed (%s)", exc)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.stop_system_metrics()
        if self.client is not None:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow set_terminated failed (%s)", exc)


def _system_monitor(uri: str, run_id: str, *, interval: float) -> Any:
    """A started MLflow ``SystemMetricsMonitor`` of ``run_id`` (continuing its steps on resume), or
    None when ``psutil`` is missing or the monitor cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:  # psutil is what it needs
        log.warning("no MLflow system metrics (%s)", exc)
        return None
    try:
        mon = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=uri)
        mon.start()
    except Exception as exc:  # noqa: BLE001 - tracking must not kill a long training
        log.warning("no MLflow system metrics (%s)", exc)
        return None
    return mon
