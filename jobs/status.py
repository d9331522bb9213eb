"""``sepnet status STUDY``: where each job of a study is (done / running / failed / todo)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sepnet.core.errors import DataError
from sepnet.hpc.scheduling import pid_alive, slurm_states
from sepnet.jobs.study import Layout


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study folder (the config's root) or the study YAML")


def study_status(root: Path) -> list[tuple[str, str, str]]:
    """Rows (job name, state, job id) from the study folder's files and the scheduler."""
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
    for name in sorted(names, key=lambda n: (n.split("/")[0] != "train", n)):
        kind, *rest = name.split("/")
        if kind == "train":
            done = (root / "models" / rest[0] / rest[1] / "done.json").is_file()
        elif kind == "evaluate":
            done = (root / "eval" / rest[0] / "done.json").is_file()
        else:
            done = layout.reported()
        info = submitted.get(name, {})
        jid = str(info.get("job_id", ""))
        if done:
            state = "done"
        elif info.get("executor") == "slurm":
            state = slurm.get(jid, "submitted").lower()
        elif jid.isdigit() and pid_alive(int(jid)):
            state = "running"
        elif jid:
            state = "not running (rerun `sepnet cv` to resume)"
        else:
            state = "todo"
        rows.append((name, state, jid))
    return rows


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
    for name, state, jid in rows:
        print(f"{name:<{width}}  {state:<12} {jid}")
    n_done = sum(r[1] == "done" for r in rows)
    print(f"{n_done}/{len(rows)} done" + (f"; report: {root / 'report' / 'report.md'}"
                                          if Layout(root).reported() else ""))
    ctl = Layout(root).jobs_file
    if ctl.is_file():
        pid = json.loads(ctl.read_text()).get("controller_pid")
        if pid:
            print(f"background controller pid {pid}: {'running' if pid_alive(pid) else 'exited'}")
    return 0
