"""Tests of the run settings and their validation."""

import pytest

from zdni.config import ConfigError, RunConfig


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "magic"}, "mode must be one of"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"ring_size": 4, "max_inflight": 4}, "must exceed max_inflight"),
        ({"model": "seed-cnn"}, "use --dataset cifar10"),
        ({"dataset": "cifar10"}, "use --dataset mnist"),
        ({"run_id": "bad id!"}, "run_id"),
        ({"train_limit": 0}, "train_limit"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"ring_mirror_every": 0}, r"ring_mirror_every must be 1\.\.ring_size \(32\)"),
        ({"ring_mirror_every": 9, "ring_size": 8}, r"1\.\.ring_size \(8\).*got 9"),
        ({"ring_mirror_every": True}, "ring_mirror_every must be"),
    ],
)
def test_bad_settings_name_the_setting(changes: dict, message: str) -> None:
    """Each bad setting raises ConfigError whose message names it."""
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes).validate()


def test_json_round_trip_and_unknown_keys() -> None:
    """The published JSON reads back equal; unknown keys and bad JSON are errors."""
    cfg = RunConfig(mode="full", conditioned=True, cuts=[1, 2], run_id="r1")
    assert RunConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown settings: bogus"):
        RunConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json(b"{nope")
