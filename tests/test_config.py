"""The typed study config: shipped configs load; bad keys and types are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sepnet.core.errors import ConfigError
from sepnet.jobs.config import config_from_dict, flatten, load_config
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


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"training": {"batch_sise": 2}}, "unknown key training.batch_sise"),
        ({"training": {"batch_size": "two"}}, "training.batch_size: expected an integer"),
        ({"training": {"amp": "yes"}}, "training.amp: expected true/false"),
        ({"training": {"patch": [12, 128, 128]}}, "divisible by 8"),
        ({"executor": {"kind": "kubernetes"}}, "executor.kind"),
        ({"executor": {"gpus": 2}}, "unknown key executor.gpus"),
        ({"members": [{"name": "a", "network": "resnet"}]}, "members[0].network: unknown network 'resnet'"),
        ({"members": [{"name": "a", "loss": "focal"}]}, "members[0].loss: unknown loss 'focal'"),
        ({"members": [{"name": "a", "transform": "NLF1"}]}, "not in preprocess.transforms"),
        ({"members": [{"name": "a"}, {"name": "a"}]}, "duplicate model name 'a'"),
        ({"bogus": 1}, "unknown key bogus"),
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
