"""`sepnet status`: each job's state and the latest progress line of its log file."""

from __future__ import annotations

import json
import os
import re

from sepnet.hpc.atomic import atomic_write_json
from sepnet.jobs.cli import main
from sepnet.jobs.status import latest_progress, study_status


def test_latest_progress_takes_the_last_progress_line(tmp_path):
    out, err = tmp_path / "1_0_log.out", tmp_path / "1_0_log.err"
    out.write_text("submitit INFO starting\nprogress m it 50/100 loss 1.0\nsome other print\n"
                   "validation m it 50/100: mean foreground Dice 0.5\nprogress m it 100/100 loss 0.5\nbye\n")
    err.write_text("progress from stderr\n")
    assert latest_progress([out, err]) == "progress m it 100/100 loss 0.5"
    # a bar redrawn with carriage returns, only in stderr: its last state
    out.write_text("nothing yet\n")
    err.write_text("preprocess [1/3] a: 1.0 s ok\rpreprocess [2/3] b: 1.5 s ok\r")
    assert latest_progress([out, err]) == "preprocess [2/3] b: 1.5 s ok"
    assert latest_progress([tmp_path / "missing.out"]) == ""


def test_latest_progress_reads_only_the_tail(tmp_path):
    log = tmp_path / "big_log.out"
    with open(log, "w") as fh:
        fh.write("progress early it 1/9\n")
        fh.write("x" * 200_000 + "\n")  # the early line is beyond the tail
        fh.write("progress late it 9/9\n")
    assert latest_progress([log]) == "progress late it 9/9"
    log.write_text("progress early it 1/9\n" + "y" * 200_000 + "\n")
    assert latest_progress([log]) == ""


def test_status_shows_state_and_latest_line_per_job(tmp_path, capsys):
    root = tmp_path / "study"
    logs = root / "logs"
    logs.mkdir(parents=True)
    dead = 2**22 + 12345  # beyond pid_max: no such process
    jobs = {}
    texts = {"preprocess/shard0": "preprocess [1/1] phantom_000: 0.5 s ok\npreprocess shard 0/1: 1 written\n",
             "train/fold0/m1": "progress fold0/m1 it 10/40 loss 0.9 lr 1e-3 2.0 it/s data-wait 3% ETA 0:00:15\n",
             "train/fold0/m2": ""}
    for name, text in texts.items():
        out = logs / f"{name.replace('/', '-')}_0_log.out"
        out.write_text(text)
        jid = str(os.getpid()) if name == "train/fold0/m1" else str(dead)
        jobs[name] = {"job_id": jid, "executor": "local", "log": str(logs), "stdout": str(out),
                      "stderr": str(out.with_suffix(".err"))}
    atomic_write_json(root / "jobs.json", {"jobs": jobs})
    (root / "store").mkdir()
    (root / "store" / "fingerprint.json").write_text("{}")
    (root / "models" / "fold0" / "m2").mkdir(parents=True)
    (root / "models" / "fold0" / "m2" / "done.json").write_text(json.dumps({"iterations": 40}))
    rows = {r[0]: r[1:] for r in study_status(root)}
    assert rows["preprocess/shard0"] == ("done", str(dead), "preprocess shard 0/1: 1 written")
    assert rows["train/fold0/m1"][0] == "running" and rows["train/fold0/m1"][2].startswith("progress fold0/m1 it 10/40")
    assert rows["train/fold0/m2"] == ("done", str(dead), "")
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out[:3]] == ["preprocess/shard0", "train/fold0/m1", "train/fold0/m2"]
    assert re.match(r"train/fold0/m1\s+running\s+\d+\s+progress fold0/m1 it 10/40 loss 0.9", out[1])
    assert out[3] == "2/3 done"
