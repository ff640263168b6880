"""pipeline.config: YAML + overrides, strict keys and types, cross-field rules, derived values."""

from __future__ import annotations

import pytest

from pipeline.config import (
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    flatten,
    generator_lr,
    global_batch,
    load_config,
    scaled_overlap,
    target_size,
    tracking_uri,
)


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_load_with_types_and_a_round_trip(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 16\n  image_size: 64\nmodel:\n  image_size: 64\n")
    cfg = load_config(path, ["train.max_steps=7", "loss.lambda_adv=0", "mask.fill_rgb=[1,2,3]"])
    assert cfg.data.batch_size == 16 and cfg.train.max_steps == 7
    assert cfg.loss.lambda_adv == 0.0 and isinstance(cfg.loss.lambda_adv, float)  # int -> float
    assert cfg.mask.fill_rgb == (1, 2, 3)  # list -> tuple
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.max_stpes=5"], r"unknown config key\(s\) \['max_stpes'\] at train"),
        (["train.max_steps=five"], "train.max_steps: expected int"),
        (["train.max_steps=true"], "train.max_steps: expected int"),  # a bool is not an int
        (["mask.kind=hexagon"], "hexagon"),
        (["train.precision=fp8"], "fp8"),
        (["data.image_size=48", "model.image_size=48"], "multiple of 32"),
        (["data.image_size=64"], "model.image_size must equal data.image_size"),
        (["mask.kind=random_block"], "needs model.full_image_output=true"),
        (["loss.lambda_rec=0", "loss.lambda_adv=0"], "at least one loss weight"),
        (["train.lr_g=-1"], "lr_g must be >= 0"),
        (["nonsense"], "not of the form section.key=value"),
    ],
)
def test_bad_values_are_errors_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file_and_empty_override_value(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    assert apply_overrides({"data": {"val_shards": "x"}}, ["data.val_shards="]) == {
        "data": {"val_shards": ""}
    }


@pytest.mark.parametrize(
    ("lambda_adv", "lr_g", "expected"), [(0.001, 0.0, 2e-3), (0.0, 0.0, 2e-4), (0.5, 1e-3, 1e-3)]
)
def test_generator_lr_is_10x_the_base_rate_only_with_the_adversarial_loss(
    lambda_adv, lr_g, expected
):
    train = TrainConfig(lr_d=2e-4, lr_g=lr_g)
    assert generator_lr(train, LossConfig(lambda_adv=lambda_adv)) == pytest.approx(expected)


def test_derived_sizes_and_tracking_uri(tmp_path):
    cfg = Config(data=DataConfig(batch_size=64), run=RunConfig(num_workers=4))
    assert global_batch(cfg) == 256
    assert global_batch(Config(run=RunConfig(num_workers=0))) == 64  # 0 workers = one process
    assert target_size(cfg.model) == 64  # the centre half of 128
    assert scaled_overlap(cfg.mask, 128) == 4 and scaled_overlap(cfg.mask, 32) == 1
    uri = tracking_uri(RunConfig(output_root=str(tmp_path / "rel")))
    assert uri == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    assert tracking_uri(RunConfig(tracking_uri="http://h:5000")) == "http://h:5000"


def test_flatten_gives_dotted_keys():
    flat = flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3})
    assert flat == {"a.b": 1, "a.c.d": 2, "e": 3}
