"""``sepnet status STUDY``: where each job of a study is (done / running / failed / todo) and the latest
progress line of its log (training: ``progress ...`` / ``validation ...``; preprocessing and evaluation: one
line per case, ``preprocess ...`` / ``evaluate ...``; a fan-out's ``infer/fold<F>/<model>`` jobs
``infer ...``, its ``fuse/fold<F>`` jobs ``evaluate ...``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sepnet.core.errors import DataError
from sepnet.hpc.scheduling import pid_alive, slurm_states
from sepnet.jobs.study import Layout


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study folder (the config's root) or the study YAML")


# the lines the jobs write to their logs
PROGRESS_PREFIXES = ("progress ", "validation ", "preprocess ", "infer ", "evaluate ")
_TAIL_BYTES = 64 * 1024


def latest_progress(paths: list[Path]) -> str:
    """The last progress line (``PROGRESS_PREFIXES``) in the tails of these log files, "" when none.

    A carriage return (a progress bar) also ends a line. The stdout file is read first; a line found
    there wins."""
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, 2) - _TAIL_BYTES))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
        found = [ln for ln in lines if ln.startswith(PROGRESS_PREFIXES)]
        if found:
            return found[-1]
    return ""


def _log_files(info: dict) -> list[Path]:
    files = [Path(info[k]) for k in ("stdout", "stderr") if info.get(k)]
    if not files and info.get("log"):  # older jobs.json: the job's log folder only
        files = sorted(Path(info["log"]).glob("*_log.out")) + sorted(Path(info["log"]).glob("*_log.err"))
    return files


def study_status(root: Path) -> list[tuple[str, str, str, str]]:
    """Rows (job name, state, job id, latest progress line of its log or "") from the study folder's
    files and the scheduler."""
    layout = Layout(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such study folder")
    submitted = {}
    if layout.jobs_file.is_file():
        submitted = json.loads(layout.jobs_file.read_text()).get("jobs", {})
    slurm = slurm_states([j["job_id"] for j in submitted.values() if j.get("executor") == "slurm"])
    rows = []
    names = set(submitted)
    models_dir = root / "models"
    if models_dir.is_dir():
        for fold_dir in sorted(models_dir.iterdir()):
            for mdir in sorted(fold_dir.iterdir()):
                names.add(f"train/{fold_dir.name}/{mdir.name}")
    order = {"preprocess": 0, "train": 1, "infer": 2, "evaluate": 3, "fuse": 3}  # graph order
    for name in sorted(names, key=lambda n: (order.get(n.split("/")[0], 4), n)):
        info = submitted.get(name, {})
        jid = str(info.get("job_id", ""))
        rows.append((name, _state(layout, name, info, slurm), jid, latest_progress(_log_files(info))))
    return rows


def _state(layout: Layout, name: str, info: dict, slurm: dict[str, str]) -> str:
    kind, *rest = name.split("/")
    jid = str(info.get("job_id", ""))
    if kind == "train":
        done = layout.trained(int(rest[0].removeprefix("fold")), rest[1]) if rest[0].startswith("fold") else False
    elif kind in ("evaluate", "fuse"):
        done = (layout.root / "eval" / rest[0] / "done.json").is_file()
    elif kind == "infer":  # its outputs (and their done.json) are removed once the fold is fused
        fold_dir = layout.root / "eval" / rest[0]
        done = (fold_dir / "done.json").is_file() or (fold_dir / "outputs" / rest[1] / "done.json").is_file()
    elif kind == "preprocess":  # a shard has no file of its own: its job's state; the fingerprint ends the stage
        done = (layout.store / "fingerprint.json").is_file() and not (
            info.get("executor") != "slurm" and jid.isdigit() and pid_alive(int(jid)))
        if info.get("executor") == "slurm" and jid in slurm:
            done = slurm[jid] == "COMPLETED"
    else:
        done = layout.reported()
    if done:
        return "done"
    if info.get("executor") == "slurm":
        return slurm.get(jid, "submitted").lower()
    if jid.isdigit() and pid_alive(int(jid)):
        return "running"
    if jid:
        return "not running (rerun `sepnet cv` to resume)"
    return "todo"


def run(args: argparse.Namespace) -> int:
    root = Path(args.study)
    if root.suffix in (".yaml", ".yml"):
        from sepnet.jobs.config import load_config

        root = Path(load_config(root).root)
    rows = study_status(root)
    if not rows:
        print(f"{root}: nothing submitted yet")
        return 0
    width = max(len(r[0]) for r in rows)
    for name, state, jid, line in rows:
        print(f"{name:<{width}}  {state:<12} {jid:<10} {line}".rstrip())
    n_done = sum(r[1] == "done" for r in rows)
    print(f"{n_done}/{len(rows)} done" + (f"; report: {root / 'report' / 'report.md'}"
                                          if Layout(root).reported() else ""))
    ctl = Layout(root).jobs_file
    if ctl.is_file():
        pid = json.loads(ctl.read_text()).get("controller_pid")
        if pid:
            print(f"background controller pid {pid}: {'running' if pid_alive(pid) else 'exited'}")
    return 0
