"""The typed study config: shipped configs load; bad keys and types are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sepnet.core.errors import ConfigError
from sepnet.jobs.config import config_from_dict, dump_config, flatten, load_config
from sepnet.jobs.study import make_folds

ROOT = Path(__file__).resolve().parents[1]


def minimal(**extra):
    d = {
        "name": "t",
        "root": "study",
        "datasets": [{"path": "data"}],
        "members": [{"name": "m1", "network": "sepnet", "transform": "SLF1", "loss": "ath_exp_log", "alpha": 0.5}],
    }
    d.update(extra)
    return d


@pytest.mark.parametrize("name", ["quickstart.yaml", "structseg2019.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert len(cfg.members) == 6 and len(cfg.baselines) == 3
    # the paper's ensemble: {SLF1, SLF2, SLF3} x ATH alpha {0.5, 1} with SepNet
    assert {(m.transform, m.alpha) for m in cfg.members} == {
        (t, a) for t in ("SLF1", "SLF2", "SLF3") for a in (0.5, 1.0)
    }
    assert all(m.network == "sepnet" and m.loss == "ath_exp_log" for m in cfg.members)
    assert cfg.source_text == (ROOT / "configs" / name).read_text()
    assert Path(cfg.root).is_absolute()


def test_paper_protocol_defaults():
    cfg = config_from_dict(minimal())
    t = cfg.training
    assert (t.lr, t.weight_decay, t.lr_decay, t.lr_step_epochs) == (1e-3, 1e-8, 0.9, 10)
    assert t.patch == [16, 128, 128]
    assert cfg.preprocess.crop == [256, 256] and cfg.preprocess.chunks == [1, 16, 128, 128]
    assert (t.cpu_bf16, cfg.inference.cpu_bf16) == (False, "auto")  # measured: docs/benchmarks.md, section 7


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"training": {"batch_sise": 2}}, "unknown key training.batch_sise"),
        ({"training": {"batch_size": "two"}}, "training.batch_size: expected an integer"),
        ({"training": {"amp": "yes"}}, "training.amp: expected true/false"),
        ({"inference": {"cpu_bf16": "yes"}}, "inference.cpu_bf16: expected true/false or 'auto', got 'yes'"),
        ({"training": {"patch": [12, 128, 128]}}, "divisible by 8"),
        ({"executor": {"kind": "kubernetes"}}, "executor.kind"),
        ({"executor": {"gpus": 2}}, "unknown key executor.gpus"),
        ({"members": [{"name": "a", "network": "resnet"}]}, "members[0].network: unknown network 'resnet'"),
        ({"members": [{"name": "a", "loss": "focal"}]}, "members[0].loss: unknown loss 'focal'"),
        ({"members": [{"name": "a", "transform": "NLF1"}]}, "not in preprocess.transforms"),
        ({"members": [{"name": "a"}, {"name": "a"}]}, "duplicate model name 'a'"),
        ({"bogus": 1}, "unknown key bogus"),
        # checked at load time, not in the middle of a study
        ({"ensemble": {"rank_weights": [3, 1]}}, "ensemble.rank_weights: 2 weights for 1 members"),
        ({"ensemble": {"rank_weights": [0]}}, "not all 0"),
        ({"folds": {"k": 3, "folds": [0, 3]}}, "folds.folds: fold 3 does not exist (folds.k is 3: 0..2)"),
        ({"folds": {"folds": [1, 1]}}, "fold listed twice"),
        ({"preprocess": {"crop": [256, 0]}}, "preprocess.crop: expected 2 positive sizes"),
        ({"preprocess": {"spacing": [3.0, 1.0]}}, "preprocess.spacing: expected 3 positive"),
        ({"inference": {"patch": [16, -8, 128]}}, "inference.patch: expected 3 positive"),
        ({"training": {"batch_size": 0}}, "training.batch_size: must be >= 1"),
        ({"datasets": [{"path": "d", "format": "nifti"}]}, "datasets[0].format: unknown format 'nifti'"),
        ({"preprocess": {"transforms": ["SLF9"]}}, "preprocess.transforms: unknown transform 'SLF9'"),
        ({"executor": {"kind": "local", "nodes": 2}}, "executor.nodes: the local executor runs on one node"),
        ({"executor": {"kind": "slurm", "cpus_per_task": 0}}, "executor.cpus_per_task: must be >= 1"),
    ],
)
def test_bad_config_names_the_key(patch, message):
    with pytest.raises(ConfigError, match=None) as exc:
        config_from_dict(minimal(**patch))
    assert message in str(exc.value)


def test_missing_required_key():
    d = minimal()
    del d["datasets"]
    with pytest.raises(ConfigError, match="missing required key datasets"):
        config_from_dict(d)


def test_load_config_errors_name_the_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(minimal(training={"epochs": 1.5})))
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "training.epochs" in str(exc.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides_and_relative_paths(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(minimal()))
    cfg = load_config(p, overrides={"training.epochs": 3, "executor.kind": "debug"})
    assert cfg.training.epochs == 3 and cfg.executor.kind == "debug"
    assert cfg.root == str(tmp_path / "study") and cfg.datasets[0].path == str(tmp_path / "data")


def test_flatten_for_mlflow():
    flat = flatten(config_from_dict(minimal()).to_dict())
    assert flat["training.lr"] == "0.001"
    assert flat["members.0.transform"] == "SLF1"
    assert flat["executor.kind"] == "local"


def test_folds_partition_cases():
    ids = [f"c{i}" for i in range(10)]
    folds = make_folds(ids, k=5, seed=3, val_fraction=0.25)
    tests = [c for f in folds for c in f["test"]]
    assert sorted(tests) == sorted(ids)  # every case is tested exactly once
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and not set(f["train"]) & set(f["test"])
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(ids)
        assert len(f["val"]) == 2
    assert folds == make_folds(ids, k=5, seed=3, val_fraction=0.25)
    assert folds != make_folds(ids, k=5, seed=4, val_fraction=0.25)


def test_name_tables_are_the_cores(tmp_path):
    from sepnet.core.intensity import PRESETS
    from sepnet.core.losses import LOSSES
    from sepnet.core.networks import NETWORKS

    # every name of each table is accepted (no second list in the config module to fall behind)
    members = [{"name": f"{n}-{l}-{t}", "network": n, "loss": l, "transform": t}
               for n in NETWORKS for l in LOSSES for t in PRESETS]
    cfg = config_from_dict(minimal(members=members, preprocess={"transforms": list(PRESETS)}))
    assert len(cfg.members) == len(NETWORKS) * len(LOSSES) * len(PRESETS)


def test_inference_patch_resolved_in_one_place():
    assert config_from_dict(minimal()).inference_patch == [16, 128, 128]  # training.patch
    cfg = config_from_dict(minimal(inference={"patch": [32, 64, 64]}))
    assert cfg.inference_patch == [32, 64, 64]


def test_dump_config_round_trips(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(minimal(folds={"k": 3, "folds": [2]})))
    cfg = load_config(p, overrides={"training.epochs": 3, "ensemble.rank_weights": [2.0]})
    out = tmp_path / "elsewhere" / "resolved.yaml"
    out.parent.mkdir()
    out.write_text(dump_config(cfg))
    again = load_config(out)  # loads from another folder: paths were written absolute
    assert again.to_dict() == cfg.to_dict() and again.digest() == cfg.digest()
    assert again.training.epochs == 3 and again.root == str(tmp_path / "study")


@pytest.mark.parametrize("tta, axes", [(False, ()), (True, ("x",)), (["x"], ("x",)), (["z", "x"], ("z", "x"))])
def test_tta_true_means_left_right_only(tta, axes):
    cfg = config_from_dict(minimal(inference={"tta": tta}))
    assert cfg.inference.tta_axes == axes  # never y unless listed: a front-back mirrored head is no head
    assert "y" not in config_from_dict(minimal(inference={"tta": True})).inference.tta_axes


@pytest.mark.parametrize("tta", [["q"], [], ["x", "x"], "x"])
def test_bad_tta_names_the_key(tta):
    with pytest.raises(ConfigError, match="inference.tta"):
        config_from_dict(minimal(inference={"tta": tta}))


def test_organs_default_and_choice():
    assert config_from_dict(minimal()).subset.num_classes == 23
    assert config_from_dict(minimal(organs="common7")).subset.class_names[-1] == "Mandible"
    with pytest.raises(ConfigError, match="organs: unknown organ subset"):
        config_from_dict(minimal(organs="all"))


def test_paperscale_smoke_keeps_the_paper_configs_arrays_models_and_windows():
    """configs/paperscale-smoke.yaml may change data, folds, iterations, executor and validation, never what
    gives the arrays their shapes or the study its models (the issue's contract for the smoke)."""
    root = Path(__file__).resolve().parent.parent / "configs"
    paper = yaml.safe_load((root / "structseg2019.yaml").read_text())
    smoke = yaml.safe_load((root / "paperscale-smoke.yaml").read_text())
    for section, keys in {"preprocess": ("transforms", "crop", "chunks"), "training": ("base", "patch", "lr"),
                          "inference": ("overlap", "tta", "patch")}.items():
        for k in keys:
            assert smoke[section].get(k) == paper[section].get(k), f"{section}.{k}"
    for key in ("members", "baselines", "ensemble"):
        assert smoke[key] == paper[key], key
    assert smoke["evaluation"] == paper["evaluation"]
