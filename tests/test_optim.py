"""Tests of zdni.optim and zdni.optimspec: torch's optimizers and schedules as a run's settings name them, stepped
per iteration or per epoch, clipping, M's and I's own settings, and backups of the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zdni import checkpoint, methods
from zdni.codec import decode_state, encode_state
from zdni.config import ConfigError, RunConfig
from zdni.objective import Objective
from zdni.optim import Updater
from zdni.optimspec import OptimSpec, stage_spec, synth_spec
from zdni.oracle import Oracle
from zdni.trainer import build_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def lrs(spec: OptimSpec, updates: int, per_epoch: int | None = None,
        total: int | None = None) -> list[float]:
    """The learning rate of each of `updates` updates of one parameter."""
    p = nn.Parameter(torch.zeros(3))
    up = Updater(spec, [p], per_epoch, total)
    out = []
    for _ in range(updates):
        out.append(up.lr)
        p.grad = torch.ones(3)
        up.step()
    return out


def test_cosine_with_warmup_by_iteration() -> None:
    """Warm-up rises as lr*(t+1)/(w+1), then the cosine falls to lr_min at the run's end."""
    spec = OptimSpec(lr=1.0, lr_schedule="cosine", warmup=3, lr_min=0.1)
    got = lrs(spec, 13, total=13)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)]
    assert got[3:] == pytest.approx(cosine)


def test_step_schedule_by_epoch_steps_once_per_epoch() -> None:
    """By epoch, the schedule moves once every epoch_batches updates."""
    spec = OptimSpec(lr=1.0, lr_schedule="step", lr_step_size=2, lr_gamma=0.5,
                     schedule_by="epoch")
    got = lrs(spec, 12, per_epoch=3)
    assert got == pytest.approx([1.0] * 6 + [0.5] * 6)


def test_clipping_bounds_the_update_norm() -> None:
    """SGD without momentum moves a clipped parameter by exactly lr * clip_norm."""
    p = nn.Parameter(torch.zeros(4))
    up = Updater(OptimSpec(optimizer="sgd", lr=0.1, momentum=0.0, clip_norm=2.0), [p])
    p.grad = torch.full((4,), 100.0)
    up.step()
    assert float(p.detach().norm()) == pytest.approx(0.1 * 2.0)


def test_torch_optimizers_with_their_settings() -> None:
    """adamw is AdamW with its decay, sgd takes momentum and Nesterov, adam its L2 decay."""
    p = [nn.Parameter(torch.zeros(1))]
    adamw = Updater(OptimSpec(optimizer="adamw", weight_decay=0.05), p).opt
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05
    sgd = Updater(OptimSpec(optimizer="sgd", momentum=0.8, nesterov=True), p).opt
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    assert type(Updater(OptimSpec(weight_decay=1e-4), p).opt) is torch.optim.Adam


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_step_is_fused_where_torch_has_the_kernel(name: str) -> None:
    """CPU float parameters get torch's fused step, which takes the same step as the unfused
    one up to the last bits; parameters it cannot take (complex) get the unfused one."""
    spec = OptimSpec(optimizer=name, lr=1e-2, momentum=0.9)
    fused = [nn.Parameter(torch.linspace(-1, 1, 64).reshape(8, 8))]
    plain = [nn.Parameter(fused[0].detach().clone())]
    up = Updater(spec, fused)
    assert up.opt.defaults["fused"] is True
    ref = type(up.opt)(plain, **{k: v for k, v in up.opt.defaults.items()
                                 if k not in ("fused", "decoupled_weight_decay")})
    for step in range(5):
        g = torch.sin(torch.arange(64.0) * (step + 1)).reshape(8, 8)
        fused[0].grad, plain[0].grad = g.clone(), g.clone()
        up.step()
        ref.step()
    assert not torch.equal(fused[0], fused[0].detach() * 0)  # it moved
    assert torch.allclose(fused[0], plain[0], rtol=0, atol=1e-6)
    complex_ = [nn.Parameter(torch.zeros(2, dtype=torch.complex64))]
    assert not Updater(spec, complex_).opt.defaults.get("fused")


def test_synthesizers_take_the_stages_settings_unless_overridden() -> None:
    """M and I use the stages' settings with synth_lr, each overridden by synth_optim."""
    cfg = RunConfig(optimizer="adamw", weight_decay=0.1, lr_schedule="cosine", clip_norm=1.0,
                    synth_optim={"optimizer": "sgd", "clip_norm": 0.5}).validate()
    assert stage_spec(cfg).optimizer == "adamw" and stage_spec(cfg).lr == cfg.lr
    spec = synth_spec(cfg)
    assert (spec.optimizer, spec.clip_norm, spec.lr) == ("sgd", 0.5, cfg.synth_lr)
    assert (spec.weight_decay, spec.lr_schedule) == (0.1, "cosine")


@pytest.mark.parametrize(("changes", "message"), [
    ({"optimizer": "lamb"}, "optimizer must be adam or adamw or sgd"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"nesterov": True, "optimizer": "adam"}, "nesterov needs optimizer sgd"),
    ({"lr_schedule": "onecycle"}, "lr_schedule must be"),
    ({"warmup": -2}, "warmup must be a whole number >= 0"),
    ({"synth_optim": {"lr": 1.0}}, "synth_optim: unknown settings"),
    ({"synth_optim": {"clip_norm": -1}}, r"synth_optim \(M and I\): clip_norm"),
    ({"max_iterations": 0}, "max_iterations must be >= 1"),
    ({"lr_schedule": "cosine", "lr_min": 1e-3, "lr": 1e-2},
     r"above M's and I's learning rate, synth_lr 0.0001.*--synth-optim lr_min=X"),
    ({"lr_schedule": "cosine", "synth_optim": {"lr_min": 1e-3}},
     r"synth_optim \(M and I\): lr_min must be at most lr"),
])
def test_bad_optimizer_settings_name_the_setting(changes: dict, message: str) -> None:
    """Each bad optimizer setting is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes).validate()


@pytest.mark.parametrize("mode", methods.names())
def test_every_method_takes_the_users_loss_and_recipe_and_a_backup_keeps_it(mode: str) -> None:
    """Every method: the last stage minimizes the user's loss on float targets, each stage and
    each M and I make one update per iteration (so a schedule counted in updates steps the
    same in a worker), and a backup (through the codec) carries the update count and schedule
    position: the restored pipeline goes on with the same learning rates and parameters."""
    cfg = RunConfig(mode=mode, stages=3, conditioned=methods.get(mode).synthetic,
                    optimizer="adamw",
                    weight_decay=0.01, lr_schedule="cosine", warmup=2, clip_norm=0.5,
                    epoch_batches=4, epochs=2, target_dtype="float32", label_shape=[10],
                    loss="live", synth_optim={"optimizer": "sgd", "lr_schedule": "step",
                                              "schedule_by": "epoch", "warmup": 0}).validate()
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((y.dtype, tuple(y.shape)))
        return torch.nn.functional.mse_loss(out, y)

    objective = Objective(cfg.loss, cfg.metric, loss_fn=mse)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 28, 28, generator=g), torch.rand(8, 10, generator=g))
            for _ in range(8)]
    first = build_pipeline(cfg, objective=objective)
    ahead = Oracle(first, first[0].largest_window(cfg))
    for it in range(5):
        ahead.feed(*data[it])
    ahead.drain()
    assert seen and set(seen) == {(torch.float32, (8, 10))}
    second = build_pipeline(cfg, objective=objective)
    for a, b in zip(first, second):
        checkpoint.restore_stage(b, *decode_state(encode_state(*checkpoint.stage_state(a, 4))))
    behind = Oracle(second, second[0].largest_window(cfg))
    behind.start_at(5)
    for it in range(5, 8):
        ahead.feed(*data[it])
        behind.feed(*data[it])
    ahead.drain()
    behind.drain()
    synths = 0
    for a, b in zip(first, second):
        assert a.updaters().keys() == b.updaters().keys()
        for name, up in a.updaters().items():
            again = b.updaters()[name]
            assert up.lr == again.lr and up.updates == again.updates == 8, (a.index, name)
            synths += name != "stage"
        for pa, pb in zip(a.module.parameters(), b.module.parameters()):
            torch.testing.assert_close(pa, pb)
    assert synths == {"backprop": 0, "sg": 2, "full": 4}.get(mode, synths)
    assert first[-1].updater is not None
    assert first[-1].updater.lr == pytest.approx(cfg.lr_min)  # the cosine's end
    for stage in first:  # M and I stepped their own schedule by epoch: x 0.1 after each epoch
        for name, up in stage.updaters().items():
            if name in ("M", "I"):  # (dgl's head follows the stage's recipe, not M's)
                assert up.lr == pytest.approx(cfg.synth_lr * 0.01), (stage.index, name)
