"""Trained models on disk: ``<root>/models/fold<F>/<model>/`` holds ``spec.json`` (how to rebuild the
network), ``best.pt`` (checkpoint with the ``model`` state dict) and ``done.json`` (validation Dice
per class, training time). Used by evaluation, the ensemble and ``sepnet predict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepnet.core.errors import DataError
from sepnet.core.networks import build


@dataclass
class TrainedModel:
    name: str
    network: torch.nn.Module
    spec: dict[str, Any]  # member config, base, channels, num_classes, patch, kind
    done: dict[str, Any]  # done.json content

    @property
    def channels(self) -> list[str]:
        return list(self.spec["channels"])

    @property
    def kind(self) -> str:
        return self.spec.get("kind", "member")

    def val_dice(self, num_classes: int) -> np.ndarray:
        """(num_classes,) validation Dice per class (index 0 = background); NaN where unknown."""
        out = np.full(num_classes, np.nan)
        per_class = self.done.get("val_dice_per_class") or self.done.get("val_dice") or {}
        if isinstance(per_class, dict):
            for k, v in per_class.items():
                if str(k).isdigit() and int(k) < num_classes and v is not None:
                    out[int(k)] = float(v)
        elif isinstance(per_class, list):
            for i, v in enumerate(per_class[:num_classes]):
                out[i] = np.nan if v is None else float(v)
        return out

    def predictor(self, device: torch.device):
        net = self.network.to(device).eval()

        @torch.no_grad()
        def predict(batch: torch.Tensor) -> torch.Tensor:
            use_amp = device.type == "cuda"
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                return net(batch.to(device)).float()

        return predict


def _state_dict(ckpt: Any) -> dict[str, torch.Tensor]:
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_trained(model_dir: str | Path, *, checkpoint: str = "best.pt") -> TrainedModel:
    """Rebuild a trained network from its folder. Missing pieces -> DataError naming the file."""
    model_dir = Path(model_dir)
    spec_file, ckpt_file, done_file = model_dir / "spec.json", model_dir / checkpoint, model_dir / "done.json"
    if not ckpt_file.is_file():
        raise DataError(f"{ckpt_file}: missing (is the model trained?)")
    try:
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{ckpt_file}: cannot load checkpoint ({str(e).splitlines()[0]})") from None
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    # spec.json (written by `sepnet cv`) wins; the training job also stores the spec in its outputs
    spec = {**(ckpt.get("spec") or {} if isinstance(ckpt, dict) else {}), **done.get("spec", {}),
            **(json.loads(spec_file.read_text()) if spec_file.is_file() else {})}
    if "member" not in spec or "channels" not in spec:
        raise DataError(f"{model_dir}: no model spec (spec.json, done.json or the checkpoint's 'spec')")
    member = spec["member"]
    net = build(
        member["network"],
        in_channels=len(spec["channels"]),
        num_classes=int(spec.get("num_classes", 23)),
        base=int(spec["base"]),
        separable_axis=member.get("separable_axis", "z"),
    )
    try:
        net.load_state_dict(_state_dict(ckpt))
    except (RuntimeError, KeyError) as e:
        raise DataError(f"{ckpt_file}: checkpoint does not fit the network ({str(e).splitlines()[0]})") from None
    return TrainedModel(name=member["name"], network=net, spec=spec, done=done)


def find_models(root: str | Path) -> dict[int, list[Path]]:
    """fold -> trained model folders (those with best.pt and done.json) under a study or models dir."""
    root = Path(root)
    base = root / "models" if (root / "models").is_dir() else root
    out: dict[int, list[Path]] = {}
    for fold_dir in sorted(base.glob("fold*")):
        if not fold_dir.name[4:].isdigit():
            continue
        dirs = [d for d in sorted(fold_dir.iterdir()) if (d / "best.pt").is_file() and (d / "done.json").is_file()]
        if dirs:
            out[int(fold_dir.name[4:])] = dirs
    return out
