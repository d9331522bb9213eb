"""The study's job graph by stage: preprocessing as its own (array of) job(s), per-stage executor
overrides checked at load and at submission, the dry run's per-stage totals, progress lines in the
job logs (local executor and real SLURM)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import write_tiny_study

from sepnet.core.errors import ConfigError
from sepnet.data.store import Store
from sepnet.hpc.resources import ExecutorConfig, StageResources
from sepnet.jobs.cli import main
from sepnet.jobs.config import load_config, stage_executor
from sepnet.jobs.status import study_status

LOCAL_STAGES = ("executor: {kind: local, array_parallelism: 2, time_min: 20, cpus_per_task: 2, stages: "
                "{preprocess: {array: 3, time_min: 30}, report: {time_min: 6, cpus_per_task: 1}}}")


def tiny_study(folder: Path, executor: str, *, log_every: int = 2) -> Path:
    """The 4-case tiny study with its executor line replaced and progress lines every ``log_every`` its."""
    cfg = write_tiny_study(folder)
    text = cfg.read_text().replace("executor: {kind: local, array_parallelism: 2, time_min: 20}", executor)
    # a long period: the lines come every ``log_every`` iterations however loaded the machine is
    text = text.replace("num_workers: 0,", f"num_workers: 0, log_every: {log_every}, log_period_s: 3600,")
    assert executor in text and "log_every" in text
    cfg.write_text(text)
    return cfg


def totals(out: str) -> dict[str, tuple[int, float, float]]:
    """stage -> (jobs, CPU-h, GPU-h) from the dry run's table."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(preprocess|train|evaluate|report|total)\s+(\d+)\s.*?\s([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)))
    return rows


def test_stage_resolution_top_level_then_defaults_then_override():
    ex = ExecutorConfig(kind="slurm", partition="gpu", nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=8,
                        stages={"evaluate": StageResources(cpus_per_task=16),
                                "report": StageResources(partition="cpu")})
    train, ev, rep, pre = (stage_executor(ex, s) for s in ("train", "evaluate", "report", "preprocess"))
    assert (train.nodes, train.gpus_per_node, train.tasks_per_node, train.cpus_per_task) == (2, 4, 4, 8)
    assert (ev.nodes, ev.gpus_per_node, ev.tasks_per_node, ev.cpus_per_task, ev.partition) == (1, 1, 1, 16, "gpu")
    assert (rep.gpus_per_node, rep.cpus_per_task, rep.partition) == (0, 8, "cpu")
    assert (pre.nodes, pre.gpus_per_node, pre.tasks_per_node) == (1, 0, 1) and not pre.stages


def test_dry_run_prints_stage_totals(tmp_path, capsys):
    cfg = tiny_study(tmp_path / "a", LOCAL_STAGES)
    assert main(["cv", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    t = totals(out)
    # by hand: jobs x nodes x tasks x cpus x minutes / 60
    assert t["preprocess"] == (3, 3 * 2 * 30 / 60, 0.0)
    assert t["train"] == (6, 6 * 2 * 20 / 60, 0.0)
    assert t["evaluate"] == (2, round(2 * 2 * 20 / 60, 2), 0.0)
    assert t["report"] == (1, 1 * 1 * 6 / 60, 0.0)
    assert t["total"] == (12, round(3 + 4 + 4 / 3 + 0.1, 2), 0.0)
    assert out.count("(after 3 preprocess job(s))") == 6
    assert not (tmp_path / "a" / "study").exists() and not (tmp_path / "a" / "data").exists()
    # GPUs: training on 2 nodes x 2 GPUs, evaluation on one GPU, preprocessing and the report on none
    gpu = ("executor: {kind: slurm, time_min: 60, nodes: 2, gpus_per_node: 2, tasks_per_node: 2, cpus_per_task: 4, "
           "stages: {preprocess: {cpus_per_task: 16, array: 2}, report: {cpus_per_task: 1, time_min: 10}}}")
    cfg = tiny_study(tmp_path / "b", gpu)
    assert main(["cv", str(cfg), "--dry-run"]) == 0
    t = totals(capsys.readouterr().out)
    assert t["preprocess"] == (2, 2 * 16 * 1.0, 0.0)
    assert t["train"] == (6, 6 * 2 * 2 * 4 * 1.0, 6 * 2 * 2 * 1.0)
    assert t["evaluate"] == (2, 2 * 4 * 1.0, 2 * 1 * 1.0)
    assert t["report"] == (1, round(1 / 6, 2), 0.0)
    assert t["total"][2] == 24 + 2


@pytest.mark.parametrize("stages, message", [
    ("{preprocess: {cpus_per_task: 0}}", "executor.stages.preprocess.cpus_per_task: must be >= 1, got 0"),
    ("{prep: {cpus_per_task: 2}}", "executor.stages: unknown stage 'prep'; known: preprocess, train, evaluate"),
    ("{report: {cpus: 2}}", "unknown key executor.stages.report.cpus"),
    ("{evaluate: {time_min: soon}}", "executor.stages.evaluate.time_min: expected an integer"),
    ("{train: {array: 4}}", "executor.stages.train.array: only preprocess splits into an array"),
    ("{preprocess: {array: 0}}", "executor.stages.preprocess.array: must be >= 1, got 0"),
    ("{evaluate: {nodes: 2}}", "executor.stages.evaluate.nodes: the local executor runs on one node"),
])
def test_bad_stage_override_is_one_line_config_error(tmp_path, capsys, stages, message):
    cfg = tiny_study(tmp_path, f"executor: {{kind: local, stages: {stages}}}")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cfg)
    assert main(["cv", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "study").exists()


def test_shards_fill_one_store_and_the_last_writes_the_fingerprint(tmp_path, capsys):
    """Two preprocessing shards of 4 phantom cases (in-process here; as jobs in the slow test below)."""
    from sepnet.data.preprocess import init_store
    from sepnet.jobs.preprocess import PreprocessTask, data_ready

    cfg = load_config(tiny_study(tmp_path, "executor: {kind: local, stages: {preprocess: {array: 2}}}"))
    store = tmp_path / "study" / "store"
    init_store(store)
    shard0, shard1 = (PreprocessTask(cfg, store=str(store), shard=i, shards=2) for i in (0, 1))
    assert [c for _, c in shard0.mine()] == ["phantom_000", "phantom_002"]
    assert shard0()["written"] == 2
    out = capsys.readouterr().out
    assert re.findall(r"^preprocess \[\d/2\] (phantom_\d+): [\d.]+ s ok$", out, flags=re.M) == [
        "phantom_000", "phantom_002"]
    # only its own cases were generated and stored; the study is not complete: no fingerprint yet
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["phantom_000", "phantom_002"]
    assert Store(store).case_ids == ["phantom_000", "phantom_002"]
    assert not (store / "fingerprint.json").exists() and not data_ready(cfg, store)
    assert shard1()["written"] == 2
    assert Store(store).case_ids == [f"phantom_{i:03d}" for i in range(4)]
    assert len(json.loads((store / "fingerprint.json").read_text())["cases"]) == 4 and data_ready(cfg, store)
    # a rerun skips complete cases
    capsys.readouterr()
    assert shard0()["written"] == 0
    assert "preprocess shard 0/2: 0 written, 2 up to date" in capsys.readouterr().out


def test_training_logs_progress_and_validation_lines(tmp_path, tiny_store, capsys):
    from sepnet.jobs.config import MemberConfig, TrainingConfig
    from sepnet.jobs.spec import TrainSpec
    from sepnet.jobs.train import TrainTask

    tr = TrainingConfig(base=4, patch=[8, 32, 32], batch_size=1, epochs=1, iterations_per_epoch=5, val_every=5,
                        checkpoint_every=5, num_workers=0, log_every=2, log_period_s=3600.0)
    spec = TrainSpec(study_root=str(tmp_path), store=str(tiny_store), member=MemberConfig(name="m1"), training=tr,
                     fold=0, train_cases=["case00", "case01"], val_cases=["case03"], val_patch=[16, 64, 64])
    TrainTask(spec)()
    out = capsys.readouterr().out
    lines = re.findall(r"^progress fold0/m1 it (\d)/5 loss ([\d.]+) lr 1.00e-03 ([\d.]+) it/s data-wait (\d+)% "
                       r"ETA (\d+:\d\d:\d\d)$", out, flags=re.M)
    assert [ln[0] for ln in lines] == ["2", "4", "5"]  # every 2 iterations, and the last
    assert lines[-1][4] == "0:00:00" and all(0 <= int(ln[3]) <= 100 for ln in lines)
    done = json.loads((tmp_path / "models" / "fold0" / "m1" / "done.json").read_text())
    m = re.search(r"^validation fold0/m1 it 5/5: mean foreground Dice ([\d.]+)", out, flags=re.M)
    assert m and float(m.group(1)) == pytest.approx(done["best_score"], abs=1e-4)


@pytest.mark.slow
def test_preprocessing_runs_as_its_own_jobs_and_logs_progress(tmp_path, capsys):
    """Local executor: 3 preprocessing shards (2 at a time) fill one store, then training, evaluation,
    report; every job logs progress and `sepnet status` shows the latest line of each."""
    cfg = tiny_study(tmp_path, LOCAL_STAGES)
    one = ["--set", "folds.folds=[0]", "--set", "baselines=[]"]
    assert main(["cv", str(cfg), *one]) == 0
    root = tmp_path / "study"
    jobs = json.loads((root / "jobs.json").read_text())["jobs"]
    shards = sorted(n for n in jobs if n.startswith("preprocess/"))
    assert shards == ["preprocess/shard0", "preprocess/shard1", "preprocess/shard2"]
    assert len({jobs[n]["job_id"] for n in shards}) == 3  # separate jobs, not this process
    store = Store(root / "store")
    assert store.case_ids == [f"phantom_{i:03d}" for i in range(4)]
    assert (root / "store" / "fingerprint.json").is_file()
    assert len(json.loads((root / "store" / "fingerprint.json").read_text())["cases"]) == 4
    # one line per case in the shard logs; shard i of 3 holds cases i, i+3, ...
    logs = {n: Path(jobs[n]["stdout"]).read_text() for n in jobs}
    assert re.findall(r"preprocess \[\d/\d\] (phantom_\d+): [\d.]+ s ok", logs["preprocess/shard0"]) == [
        "phantom_000", "phantom_003"]
    # training: a progress line every 2 iterations (4 in all) and the validation result
    train = logs["train/fold0/sep-slf1-a05"]
    steps = re.findall(r"^progress fold0/sep-slf1-a05 it (\d+)/4 loss [\d.]+ lr [\d.e+-]+ [\d.]+ it/s "
                       r"data-wait \d+% ETA [\d:?]+$", train, flags=re.M)
    assert steps == ["2", "4"]
    assert re.search(r"^validation fold0/sep-slf1-a05 it 4/4: mean foreground Dice [\d.]+", train, flags=re.M)
    rows = {r[0]: r for r in study_status(root)}
    assert rows["train/fold0/sep-slf1-a05"][1] == "done"
    assert rows["train/fold0/sep-slf1-a05"][3].startswith("validation fold0/sep-slf1-a05 it 4/4")
    assert rows["preprocess/shard1"][1] == "done" and rows["preprocess/shard1"][3].startswith("preprocess shard 1/3")
    capsys.readouterr()
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train/fold0/sep-slf2-a1\s+done\s+\d+\s+validation fold0/sep-slf2-a1 it 4/4", out)
    # a rerun: the store is up to date, so no preprocessing job is planned
    assert main(["cv", str(cfg), *one, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[done] preprocess: 3 job(s)" in out and totals(out)["total"][0] == 0


def _scontrol(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` of a queued or running job (or array task) as key -> value."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _wait_for(path: Path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s:.0f} s"
        time.sleep(3)


@pytest.mark.slurm
def test_stages_on_slurm_get_their_own_resources(tmp_path, slurm, capsys):
    """A study queued on SLURM: the shards as one array, the trainings as one array after them, the
    evaluation fanned out (one infer job per model, as one array after the trainings, and a fuse job
    after those) and the report after it, each stage with the CPUs and memory its override asks for."""
    ex = ("executor: {kind: slurm, time_min: 20, cpus_per_task: 1, mem_gb: 3, stages: {"
          "preprocess: {array: 2, cpus_per_task: 2, mem_gb: 2, time_min: 15}, "
          "evaluate: {cpus_per_task: 2, mem_gb: 4}, report: {cpus_per_task: 1, mem_gb: 1, time_min: 5}}}")
    cfg = tiny_study(tmp_path, ex)
    assert main(["cv", str(cfg), "--set", "folds.folds=[0]", "--set", "baselines=[]",
                 "--set", "evaluation.fan_out=true", "--detach"]) == 0
    root = tmp_path / "study"
    jobs = json.loads((root / "jobs.json").read_text())["jobs"]
    assert sorted(jobs) == ["fuse/fold0", "infer/fold0/sep-slf1-a05", "infer/fold0/sep-slf2-a1", "preprocess/shard0",
                            "preprocess/shard1", "report", "train/fold0/sep-slf1-a05", "train/fold0/sep-slf2-a1"]
    # what the scheduler holds for each job, asked while they are queued (sacct may lag or be restarting)
    info = {n: _scontrol(j["job_id"]) for n, j in jobs.items()}
    got = {n: (i["JobName"], i["CPUs/Task"], i["MinMemoryNode"]) for n, i in info.items()}
    pre, train, ev = ("tiny-preprocess", "2", "2G"), ("tiny-train", "1", "3G"), ("tiny-evaluate", "2", "4G")
    assert got == {"preprocess/shard0": pre, "preprocess/shard1": pre, "train/fold0/sep-slf1-a05": train,
                   "train/fold0/sep-slf2-a1": train, "infer/fold0/sep-slf1-a05": ev, "infer/fold0/sep-slf2-a1": ev,
                   "fuse/fold0": ev, "report": ("tiny-report", "1", "1G")}
    arrays = {kind: {jobs[n]["job_id"].split("_")[0] for n in jobs if n.startswith(kind)}
              for kind in ("preprocess/", "train/", "infer/")}
    assert all(len(ids) == 1 for ids in arrays.values())  # one array each
    assert all(re.fullmatch(r"\d+_[01]", jobs[n]["job_id"]) for n in jobs if n.startswith(tuple(arrays)))
    train_dep = info["train/fold0/sep-slf1-a05"]["Dependency"]
    if train_dep != "(null)":  # (null) once the shards have ended and the dependency is met
        assert re.match(rf"afterok:{arrays['preprocess/'].pop()}_[01]", train_dep)
    trains = arrays["train/"].pop()
    assert re.fullmatch(rf"afterok:{trains}_[01]\(unfulfilled\),afterok:{trains}_[01]\(unfulfilled\)",
                        info["infer/fold0/sep-slf1-a05"]["Dependency"].replace("&", ","))
    infer = arrays["infer/"].pop()
    assert re.fullmatch(rf"afterok:{infer}_[01]\(unfulfilled\),afterok:{infer}_[01]\(unfulfilled\)",
                        info["fuse/fold0"]["Dependency"].replace("&", ","))
    assert info["report"]["Dependency"] == f"afterok:{jobs['fuse/fold0']['job_id']}(unfulfilled)"
    _wait_for(root / "report" / "report.json", timeout_s=840)
    # the training logs (SLURM .out files) hold progress lines; status shows them
    out = Path(jobs["train/fold0/sep-slf1-a05"]["stdout"]).read_text()
    assert re.search(r"^progress fold0/sep-slf1-a05 it 4/4 ", out, flags=re.M)
    shard1 = Path(jobs["preprocess/shard1"]["stdout"]).read_text()
    assert re.findall(r"^preprocess \[\d/2\] (phantom_\d+): [\d.]+ s ok$", shard1, flags=re.M) == [
        "phantom_001", "phantom_003"]
    rows = {r[0]: r for r in study_status(root)}
    assert rows["train/fold0/sep-slf2-a1"][3].startswith("validation fold0/sep-slf2-a1 it 4/4")
    # a request that fits no node fails before anything is queued, naming the stage
    bad = tiny_study(tmp_path / "bad", ex.replace("evaluate: {cpus_per_task: 2", "evaluate: {cpus_per_task: 64"))
    assert main(["cv", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "executor.stages.evaluate: the request does not fit partition" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "study" / "jobs.json").exists()


def test_case_ids_shared_by_two_datasets_are_refused_and_prefixes_keep_them_apart(tmp_path, capsys):
    """The store is keyed by case id: two phantom datasets both naming cases phantom_000... would overwrite
    each other's cases, so the study is refused before anything runs; distinct prefixes fix it."""
    import yaml

    from sepnet.jobs.preprocess import study_cases

    base = {"name": "mix", "root": str(tmp_path / "study"),
            "datasets": [{"path": str(tmp_path / "a"), "phantom": {"cases": 2, "size": "tiny"}},
                         {"path": str(tmp_path / "b"), "format": "pddca", "phantom": {"cases": 2, "size": "tiny"}}],
            "members": [{"name": "m"}], "folds": {"k": 2}}
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text(yaml.safe_dump(base))
    assert main(["cv", str(cfg_file), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case id 'phantom_000' is also a case of" in err[0] and str(tmp_path / "a") in err[0]
    base["datasets"][1]["phantom"]["prefix"] = "pd"
    cfg_file.write_text(yaml.safe_dump(base))
    ids = [cid for _, cid in study_cases(load_config(cfg_file))]
    assert ids == ["phantom_000", "phantom_001", "pd_000", "pd_001"]


def test_each_job_uses_its_own_stage_cpus_as_torch_threads(tmp_path):
    # training threads come from the train stage, evaluation's from the evaluate stage (not the top level)
    from sepnet.jobs.evaluate import make_eval_spec
    from sepnet.jobs.spec import train_spec

    cfg_path = tiny_study(tmp_path, "executor: {kind: local, cpus_per_task: 1, stages: {evaluate: {cpus_per_task: 2}, "
                                    "train: {cpus_per_task: 3}}}")
    cfg = load_config(cfg_path)
    folds = [{"train": ["case00", "case01"], "val": ["case02"], "test": ["case03"]}]
    assert make_eval_spec(cfg, folds, 0).threads == 2
    assert train_spec(cfg, model="unet3d", fold=0, folds=folds).threads == 3
