"""Options declared once: every config field is a CLI option with the config's own default."""

from __future__ import annotations

import dataclasses

import pytest

from ngt_ray.cli import _COMMANDS, build_parser
from ngt_ray.grouptesting.group_size import GroupSize
from ngt_ray.job.plan import ModerationConfig
from ngt_ray.options import from_args
from ngt_ray.tools.evaluate import EvaluationConfig
from ngt_ray.tools.train import TrainConfig

_REQUIRED = {"moderate": ["--input", "in", "--output", "out"], "calibrate": ["--model", "m"],
             "compress": ["--model", "m", "--output", "o"]}


@pytest.mark.parametrize("command", [c[0] for c in _COMMANDS])
def test_every_config_field_is_an_option_with_the_configs_default(command):
    parser = build_parser()
    args = parser.parse_args([command, *_REQUIRED.get(command, [])])
    _, _, handler, configs = next(c for c in _COMMANDS if c[0] == command)
    assert args.func is handler
    for config, skip in configs:
        for f in dataclasses.fields(config):
            if f.name in skip or not f.metadata.get("cli", True):
                continue
            assert hasattr(args, f.name), f"{command}: {config.__name__}.{f.name} has no option"
            if f.default is not dataclasses.MISSING:
                assert getattr(args, f.name) == f.default, f"{command} --{f.name}"


def test_options_parse_to_typed_config_values():
    parser = build_parser()
    cfg = from_args(ModerationConfig, parser.parse_args(
        ["moderate", "--input", "s3://b/p", "--output", "out", "--group-size", "4", "--stub-models",
         "--algorithm", "halve-once", "--batch-size", "64"]))
    assert (cfg.group_size, cfg.stub_models, cfg.algorithm, cfg.batch_size) == (GroupSize.fixed(4), True,
                                                                                "halve-once", 64)
    for text, size in (("auto", GroupSize.AUTO), ("none", GroupSize.NONE), ("16", GroupSize.fixed(16))):
        assert from_args(ModerationConfig, parser.parse_args(
            ["moderate", "--input", "in", "--output", "out", "--group-size", text])).group_size == size
        assert str(size) == text and GroupSize.parse(str(size)) == size  # the stats and run.json spell it so
    assert from_args(TrainConfig, parser.parse_args(["train", "--calibration-sizes", "1,2,8"])).calibration_sizes \
        == (1, 2, 8)
    assert from_args(TrainConfig, parser.parse_args(["train"])) == TrainConfig()
    evaluation = from_args(EvaluationConfig, parser.parse_args(["evaluate", "--prevalences", "0.01,0.05"]))
    assert evaluation.prevalences == (0.01, 0.05)
    for bad in (["moderate", "--output", "o"], ["moderate", "--input", "i", "--output", "o", "--algorithm", "x"],
                ["train", "--sizes-typo", "1"], ["evaluate", "--sizes", "two"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        EvaluationConfig(algorithms=("dorfman", "nope"))


@pytest.mark.parametrize("bad", ["0", "-3", "eight", "", "2.5", True])
def test_a_group_size_is_a_positive_k_auto_or_none(bad):
    with pytest.raises(ValueError, match="positive integer, 'auto' or 'none'"):
        GroupSize.parse(bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["moderate", "--input", "in", "--output", "out", "--group-size", str(bad)])
