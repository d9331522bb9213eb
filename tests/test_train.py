"""jobs.train: exact resumption, skip when done, 2-rank DDP on the local executor with MLflow, CLI checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from sepnet.core.organs import NUM_CLASSES, ORGAN_IDS
from sepnet.hpc.checkpoint import load
from sepnet.hpc.executors import make_executor, wait
from sepnet.hpc.resources import ExecutorConfig
from sepnet.jobs import cli
from sepnet.jobs.config import MemberConfig, TrainingConfig
from sepnet.jobs.spec import ModelSpec
from sepnet.jobs.train import TrainSpec, TrainTask, train_spec
from sepnet.jobs.validation import per_class_dice

TINY = TrainingConfig(base=4, patch=[8, 32, 32], batch_size=2, epochs=2, iterations_per_epoch=3, val_every=3,
                      checkpoint_every=2, num_workers=0, lr_step_epochs=1, seed=0)
VAL_PATCH = [48, 64, 64]  # covers a tiny phantom volume: validation is one forward pass


def tiny_spec(root, store, **kw) -> TrainSpec:
    base = dict(study_root=str(root), store=str(store), member=MemberConfig(name="m1", alpha=0.5), training=TINY,
                fold=0, train_cases=["case00", "case01", "case02"], val_cases=["case03"], val_patch=VAL_PATCH)
    base.update(kw)
    return TrainSpec(**base)


def test_per_class_dice_by_hand():
    ref = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 0])
    d = per_class_dice(pred, ref, num_classes=4)
    # class 0: 2*1/(3+2); class 1: 2*2/(3+2); class 2: 0; class 3: absent in both -> NaN
    assert d[:3] == pytest.approx([0.4, 0.8, 0.0]) and np.isnan(d[3])


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_is_bit_identical(tmp_path, tiny_store, workers):
    # with workers, the loader's processes persist across epochs (their case caches too) and must still
    # follow the epoch: the resumed run and the uninterrupted one see the same patches
    training = dataclasses.replace(TINY, num_workers=workers)
    full = TrainTask(tiny_spec(tmp_path / "full", tiny_store, training=training))()
    # stop mid-epoch (iteration 2 of 3), then resume across the epoch boundary and the lr step
    stopped = TrainTask(tiny_spec(tmp_path / "resumed", tiny_store, stop_after=2, training=training))()
    assert stopped == {"stopped_at": 2}
    out = tmp_path / "resumed" / "models" / "fold0" / "m1"
    assert not (out / "done.json").exists()
    # the model spec is written at the start, before the model is done
    spec = ModelSpec.read(out)
    assert (spec.network, spec.base, spec.channels, spec.kind) == ("sepnet", 4, ("SLF1",), "member")
    assert spec.num_classes == NUM_CLASSES and spec.organ_ids == ORGAN_IDS and spec.patch == (8, 32, 32)
    at2 = load(out / "last.pt")
    assert at2["step"] == 2 and at2["epoch"] == 0 and len(at2["rng"]) == 1
    resumed = TrainTask(tiny_spec(tmp_path / "resumed", tiny_store, training=training))()
    assert resumed["resumed_from"] == [2] and full["resumed_from"] == []
    a = load(tmp_path / "full" / "models" / "fold0" / "m1" / "last.pt")
    b = load(out / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # training moved the weights since the interruption, so equality is not trivial
    assert any(not torch.equal(a["model"][k], at2["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # StepLR x0.9 after each of the 2 epochs
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.9**2)
    assert resumed["val_dice"] == full["val_dice"] and len(full["val_dice"]) == NUM_CLASSES
    assert full["iterations"] == 6 and full["params"] > 0
    best = load(out / "best.pt")
    assert best["score"] == pytest.approx(resumed["best_score"])
    # one spec, in one file: not copied into the checkpoints or done.json
    assert "spec" not in best and "spec" not in at2 and "spec" not in resumed
    assert ModelSpec.read(out) == spec


def test_loader_workers_do_not_change_the_result(tmp_path, tiny_store):
    # persistent workers must follow the epoch (patches of epoch 1 differ from epoch 0's): the weights after
    # 2 epochs with 2 workers equal those of the in-process loader
    runs = {}
    for w in (0, 2):
        TrainTask(tiny_spec(tmp_path / f"w{w}", tiny_store, training=dataclasses.replace(TINY, num_workers=w)))()
        runs[w] = load(tmp_path / f"w{w}" / "models" / "fold0" / "m1" / "last.pt")["model"]
    assert all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_rerun_with_done_json_returns_immediately(tmp_path, tiny_store):
    spec = tiny_spec(tmp_path, tiny_store, training=dataclasses.replace(TINY, epochs=1, iterations_per_epoch=1))
    first = TrainTask(spec)()
    out = spec.out_dir
    stamp = (out / "last.pt").stat().st_mtime_ns
    (out / "best.pt").unlink()  # a real rerun would write it again
    again = TrainTask(spec)()
    assert again == first == json.loads((out / "done.json").read_text())
    assert (out / "last.pt").stat().st_mtime_ns == stamp and not (out / "best.pt").exists()


def test_two_rank_ddp_on_local_executor_logs_to_mlflow(tmp_path, tiny_store):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(tmp_path, tiny_store, mlflow_uri=uri, experiment="tiny", config_text="name: tiny\n# verbatim\n",
                     study_name="tiny")
    ex = make_executor(ExecutorConfig(kind="local", tasks_per_node=2, time_min=10), folder=tmp_path / "logs",
                       name="train/fold0/m1")
    job = ex.submit(TrainTask(spec))
    report = wait([job], poll_s=1.0)
    assert report.ok, report.failed
    results = job.results()
    assert len(results) == 2 and results[0] == results[1]
    done = results[0]
    assert done["world_size"] == 2 and done["iterations"] == 6
    ckpt = load(spec.out_dir / "last.pt")
    assert len(ckpt["rng"]) == 2  # both ranks' RNG states gathered
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # ranks draw different dropout
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tiny")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == done["mlflow_run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["training.lr"] == "0.001" and run.data.params["member.name"] == "m1"
    assert run.data.tags["sepnet.fold"] == "0" and run.data.tags["sepnet.key"] == "tiny/fold0/m1"
    assert run.data.tags["sepnet.executor_job_id"] == str(job.job_id)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert len(c.get_metric_history(run.info.run_id, "val_dice_mean_fg")) == 2
    path = c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert open(path).read() == "name: tiny\n# verbatim\n"


# --------------------------------------------------------------------------- CLI

def _study(tmp_path, tiny_store, *, pad=True, patch=(8, 32, 32), with_store=True):
    root = tmp_path / "study"
    if with_store:
        shutil.copytree(tiny_store, root / "store")
    cfg = tmp_path / "study.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: clitest
        root: study
        datasets: [{{path: data}}]
        preprocess: {{transforms: [SLF1], crop: null}}
        folds: {{k: 2, val_fraction: 0.3}}
        members: [{{name: m1, transform: SLF1}}]
        training: {{base: 4, patch: {list(patch)}, batch_size: 1, epochs: 1, iterations_per_epoch: 2,
                   val_every: 2, checkpoint_every: 2, num_workers: 0, pad: {str(pad).lower()}}}
        inference: {{patch: {VAL_PATCH}}}
        executor: {{kind: debug}}
        """))
    return cfg, root


def test_one_train_spec_factory(tmp_path, tiny_store):
    from sepnet.jobs.config import load_config

    cfg_path, root = _study(tmp_path, tiny_store)
    one = "members: [{name: m1, transform: SLF1}]"
    cfg_path.write_text(cfg_path.read_text().replace(one, one + "\nbaselines: [{name: u, network: unet3d}]"))
    cfg = load_config(cfg_path)
    member, baseline = train_spec(cfg, model="m1", fold=1), train_spec(cfg, model="u", fold=1)
    folds = json.loads((root / "folds.json").read_text())["folds"]  # written by the first call
    assert member.train_cases == folds[1]["train"] and member.val_cases == folds[1]["val"]
    assert (member.kind, baseline.kind, baseline.member.network) == ("member", "baseline", "unet3d")
    assert member.val_patch == VAL_PATCH == cfg.inference_patch  # validation uses the inference patch
    assert member.out_dir == root / "models" / "fold1" / "m1"
    # given the split, the same spec without reading the store
    assert train_spec(cfg, model="m1", fold=1, folds=folds) == member


def test_cli_errors_before_submission(tmp_path, tiny_store, capsys):
    cfg, root = _study(tmp_path, tiny_store, with_store=False)
    assert cli.main(["train", str(cfg), "--member", "m1", "--fold", "0"]) == 2
    assert "store not found" in capsys.readouterr().err
    shutil.copytree(tiny_store, root / "store")
    assert cli.main(["train", str(cfg), "--member", "nope", "--fold", "0"]) == 2
    assert "unknown member 'nope'; known: m1" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "--member", "m1", "--fold", "5"]) == 2
    assert "--fold 5" in capsys.readouterr().err
    cfg2, _ = _study(tmp_path / "b", tiny_store, pad=False, patch=(64, 32, 32))
    assert cli.main(["train", str(cfg2), "--member", "m1", "--fold", "0"]) == 2
    assert "larger than case" in capsys.readouterr().err
    assert not (root / "logs").exists()  # nothing was queued


def test_cli_trains_with_debug_executor(tmp_path, tiny_store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    cfg, root = _study(tmp_path, tiny_store)
    assert cli.main(["train", str(cfg), "--member", "m1", "--fold", "1"]) == 0
    done = json.loads((root / "models" / "fold1" / "m1" / "done.json").read_text())
    folds = json.loads((root / "folds.json").read_text())["folds"]
    assert done["iterations"] == 2 and done["fold"] == 1 and len(folds) == 2
    assert cli.main(["train", str(cfg), "--member", "m1", "--fold", "1"]) == 0
    assert "already trained" in capsys.readouterr().out


def test_an_organ_subset_trains_a_network_of_its_classes(tmp_path, tiny_store):
    """organs: common7 -> 8 output classes, organ ids from the subset, validation Dice of 8 classes."""
    from sepnet.core.organs import COMMON7

    spec = tiny_spec(tmp_path, tiny_store, organs="common7",
                     training=dataclasses.replace(TINY, epochs=1, iterations_per_epoch=2, val_every=2))
    assert spec.num_classes == 8 and spec.organ_ids == (1, 6, 7, 8, 12, 13, 21)
    done = TrainTask(spec)()
    assert len(done["val_dice"]) == 8
    head = [v for k, v in load(spec.out_dir / "best.pt")["model"].items() if v.ndim == 5][-1]
    assert head.shape[0] == 8  # the last convolution predicts the subset's classes
    ms = ModelSpec.read(spec.out_dir)
    assert (ms.organs, ms.num_classes, ms.organ_ids) == ("common7", 8, (1, 6, 7, 8, 12, 13, 21))
    # the spec maps the model's labels back to StructSeg ids (the mandible to its first id, 21)
    assert ms.subset == COMMON7 and ms.subset.from_subset(np.arange(8)).tolist() == [0, 1, 6, 7, 8, 12, 13, 21]


def test_model_spec_checks_its_organs_and_reads_older_specs(tmp_path):
    spec = ModelSpec(name="m", kind="member", network="sepnet", base=8, separable_axis="z", channels=("SLF1",),
                     loss="dice", alpha=0.5, num_classes=NUM_CLASSES, organ_ids=ORGAN_IDS, patch=(8, 32, 32))
    old = spec.to_dict()
    del old["organs"]  # written before organ subsets: all 22 organs
    assert ModelSpec.from_dict(old) == spec and spec.organs == "structseg22"
    with pytest.raises(ValueError, match="not those of subset common7"):
        dataclasses.replace(spec, organs="common7", num_classes=8, organ_ids=(1, 2, 3, 4, 5, 6, 7))
    with pytest.raises(ValueError, match="unknown organ subset"):
        dataclasses.replace(spec, organs="nope")


def test_study_organs_reach_the_train_spec(tmp_path, tiny_store):
    from sepnet.core.errors import ConfigError
    from sepnet.jobs.config import load_config

    cfg_path, root = _study(tmp_path, tiny_store)
    cfg_path.write_text(cfg_path.read_text().replace("root: study\n", "root: study\norgans: common7\n"))
    spec = train_spec(load_config(cfg_path), model="m1", fold=0)
    assert (spec.organs, spec.num_classes) == ("common7", 8)
    cfg_path.write_text(cfg_path.read_text().replace("organs: common7", "organs: eyes"))
    with pytest.raises(ConfigError, match="organs: unknown organ subset 'eyes'; known: structseg22, common7"):
        load_config(cfg_path)


def test_validation_slabs_by_hand(tiny_store):
    from sepnet.core.networks import build
    from sepnet.data.store import Store
    from sepnet.jobs.validation import confusion, dice_from_confusion, predict_volume, slab_starts, validate

    assert slab_starts(100, slabs=2, thickness=16) == [28, 56]  # linspace(0, 84, 4)[1:-1] = 28, 56
    assert slab_starts(30, slabs=2, thickness=16) == [0]  # would cover the volume: all of it
    assert slab_starts(40, slabs=1, thickness=16) == [12]
    # validate(slabs=1) equals the Dice of that one slab predicted alone, computed here independently
    store = Store(tiny_store)
    cid = store.case_ids[0]
    net = build("sepnet", in_channels=1, num_classes=23, base=4, seed=0).eval()
    image = torch.from_numpy(store.read_image(cid, ["SLF1"]))
    depth = image.shape[1]
    (z0,) = slab_starts(depth, slabs=1, thickness=8)
    pred = predict_volume(net, image[:, z0:z0 + 8], num_classes=23, patch=[8, 40, 40], overlap=0.5,
                          device="cpu", amp_dtype=None)
    want = dice_from_confusion(confusion(pred, store.read_label(cid)[z0:z0 + 8], num_classes=23))
    got = validate(net, store, [cid], channels=["SLF1"], num_classes=23, patch=[8, 40, 40], slabs=1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)])
