"""Tests of zdni.inbox: how an iteration's parts are joined, input checks."""

from __future__ import annotations

import pytest
import torch

from zdni.config import RunConfig
from zdni.inbox import MAX_BATCH, Inbox, check_labels, check_tensor
from zdni.protocol import MessageError

X_SHAPE = (1, 28, 28)
H_SHAPE = (256,)


def x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *X_SHAPE)


def h(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *H_SHAPE)


def y(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 10, (batch,))


def test_sg_middle_stage_fires_on_the_activation_alone() -> None:
    """sg, unconditioned: a middle stage runs its input event as soon as the activation arrives."""
    box = Inbox(RunConfig(mode="sg"), 2, 3)
    assert box.add_act(7, h(), y()) == ["input"]
    assert box.peek(7).h is not None
    box.take(7)
    assert box.parts == {}


def test_sg_first_stage_fires_on_the_batch() -> None:
    """Stage 1's true input is the batch's x: the batch alone fires 'input'."""
    box = Inbox(RunConfig(mode="sg"), 1, 3)
    assert box.add_batch(0, x(), y()) == ["input"]
    assert box.peek(0).y is not None  # stage 1 sends the labels on with its activation


def test_batch_keeps_only_what_the_stage_needs() -> None:
    """A batch's x or y that the stage does not need is not held."""
    box = Inbox(RunConfig(mode="full"), 1, 3)
    box.add_batch(0, x(), y())
    assert box.peek(0).x is not None and box.peek(0).y is None


@pytest.mark.parametrize(("mode", "conditioned", "index"),
                         [("sg", False, 3), ("sg", True, 2), ("backprop", False, 3),
                          ("backprop", False, 2)])
def test_later_stages_take_the_labels_with_the_activation(mode: str, conditioned: bool,
                                                          index: int) -> None:
    """Outside full mode an activation (h, y) alone fires 'input'; one without y, or a BATCH,
    is refused: the labels come from upstream, with the activation."""
    box = Inbox(RunConfig(mode=mode, conditioned=conditioned), index, 3)
    with pytest.raises(MessageError) as err:
        box.add_batch(3, None, y())
    assert err.value.reason == "kind"
    with pytest.raises(MessageError) as err:
        box.add_act(3, h())
    assert err.value.reason == "missing"
    labels = y()
    assert box.add_act(3, h(), labels) == ["input"]
    assert box.peek(3).y is labels


@pytest.mark.parametrize("conditioned", [False, True])
def test_full_mode_batch_then_act(conditioned: bool) -> None:
    """full, stage 2: the batch fires 'batch'; 'input' waits for the activation."""
    box = Inbox(RunConfig(mode="full", conditioned=conditioned), 2, 3)
    assert box.add_batch(5, x(), y()) == ["batch"]
    assert box.add_act(5, h()) == ["input"]


@pytest.mark.parametrize("conditioned", [False, True])
def test_full_mode_act_then_batch(conditioned: bool) -> None:
    """full, stage 2: an early activation waits; the batch then fires 'batch' before 'input'."""
    box = Inbox(RunConfig(mode="full", conditioned=conditioned), 2, 3)
    assert box.add_act(5, h()) == []
    assert box.add_batch(5, x(), y()) == ["batch", "input"]


def test_full_mode_never_fires_batch_twice() -> None:
    """full, stage 2: a repeated batch of an iteration is refused; the synthetic pass ran once."""
    box = Inbox(RunConfig(mode="full"), 2, 3)
    assert box.add_batch(1, x(), None) == ["batch"]
    with pytest.raises(MessageError) as err:
        box.add_batch(1, x(), None)
    assert err.value.reason == "duplicate"
    assert box.add_act(1, h()) == ["input"]
    assert box.peek(1).batch_done


@pytest.mark.parametrize("order", ["act first", "batch first"])
def test_first_part_wins_over_a_forged_or_repeated_one(order: str) -> None:
    """A second activation, or parts of another batch size, are refused and evict nothing:
    the genuine parts that came first still join (a forged message cannot stall an iteration)."""
    box = Inbox(RunConfig(mode="full", conditioned=True), 2, 3)
    genuine_h, labels = h(), y()
    if order == "act first":
        assert box.add_act(4, genuine_h) == []
        for forged in (lambda: box.add_act(4, h()), lambda: box.add_batch(4, x(1), y(1))):
            with pytest.raises(MessageError) as err:
                forged()
            assert err.value.reason in ("duplicate", "shape")
        assert box.add_batch(4, x(), labels) == ["batch", "input"]
    else:
        assert box.add_batch(4, x(), labels) == ["batch"]
        for forged in (lambda: box.add_batch(4, x(), y()), lambda: box.add_act(4, h()[:1])):
            with pytest.raises(MessageError) as err:
                forged()
            assert err.value.reason in ("duplicate", "shape")
        assert box.add_act(4, genuine_h) == ["input"]
    assert box.peek(4).h is genuine_h and box.peek(4).y is labels


def test_full_mode_last_stage_needs_x_and_y() -> None:
    """full, last stage: the batch needs both x and y before 'batch' fires."""
    box = Inbox(RunConfig(mode="full"), 3, 3)
    assert box.add_act(0, h()) == []
    assert box.add_batch(0, x(), y()) == ["batch", "input"]


def test_iterations_are_joined_separately() -> None:
    """Parts of different iterations never complete each other."""
    box = Inbox(RunConfig(mode="full"), 3, 3)
    assert box.add_act(1, h()) == []
    assert box.add_batch(2, x(), y()) == ["batch"]
    assert box.add_batch(1, x(), y()) == ["batch", "input"]
    assert box.add_act(2, h()) == ["input"]


def test_flood_drops_the_oldest_iteration() -> None:
    """Past `limit` held iterations, a new one evicts the oldest (lowest) iteration."""
    box = Inbox(RunConfig(mode="full"), 3, 3, limit=3)
    for it in (10, 5, 20):
        assert box.add_act(it, h()) == []
    assert box.add_act(30, h()) == []
    assert sorted(box.parts) == [10, 20, 30]
    assert box.add_batch(20, x(), y()) == ["batch", "input"]  # an existing one evicts nothing
    assert sorted(box.parts) == [10, 20, 30]
    box.add_batch(40, x(), y())
    assert sorted(box.parts) == [20, 30, 40]


GOOD_X = torch.zeros(4, *X_SHAPE)

# (name, tensor, batch, reason)
BAD_TENSORS = [
    ("missing", None, None, "missing"),
    ("float64", torch.zeros(4, *X_SHAPE, dtype=torch.float64), None, "dtype"),
    ("float16", torch.zeros(4, *X_SHAPE, dtype=torch.float16), None, "dtype"),
    ("int64", torch.zeros(4, *X_SHAPE, dtype=torch.int64), None, "dtype"),
    ("wrong width", torch.zeros(4, 1, 28, 27), None, "shape"),
    ("flattened", torch.zeros(4, 784), None, "shape"),
    ("no batch dim", torch.zeros(*X_SHAPE), None, "shape"),
    ("extra dim", torch.zeros(4, 1, 1, 28, 28), None, "shape"),
    ("batch 0", torch.zeros(0, *X_SHAPE), None, "shape"),
    ("batch mismatch", torch.zeros(4, *X_SHAPE), 8, "shape"),
]


@pytest.mark.parametrize(("name", "t", "batch", "reason"), BAD_TENSORS,
                         ids=[r[0] for r in BAD_TENSORS])
def test_check_tensor_rejects(name: str, t: torch.Tensor | None, batch: int | None,
                              reason: str) -> None:
    """A tensor of the wrong dtype, shape or batch raises MessageError with the expected reason."""
    with pytest.raises(MessageError) as err:
        check_tensor("x", t, X_SHAPE, torch.float32, batch)
    assert err.value.reason == reason
    assert "x" in str(err.value)


def test_check_tensor_accepts() -> None:
    """A tensor that fits is returned as it is, with or without a batch to match."""
    assert check_tensor("x", GOOD_X, X_SHAPE, torch.float32) is GOOD_X
    assert check_tensor("x", GOOD_X, X_SHAPE, torch.float32, batch=4) is GOOD_X
    one = torch.zeros(1, *H_SHAPE)
    assert check_tensor("h", one, H_SHAPE, torch.float32) is one


def test_check_tensor_rejects_a_batch_over_the_limit() -> None:
    """A batch over MAX_BATCH samples is refused as hostile."""
    with pytest.raises(MessageError) as err:
        check_tensor("y", torch.zeros(MAX_BATCH + 1, dtype=torch.int64), (), torch.int64)
    assert err.value.reason == "shape"


# (name, labels, batch, reason)
BAD_LABELS = [
    ("missing", None, None, "missing"),
    ("ten", torch.tensor([0, 10]), None, "value"),
    ("negative", torch.tensor([-1, 3]), None, "value"),
    ("int32", torch.tensor([1, 2], dtype=torch.int32), None, "dtype"),
    ("float", torch.tensor([1.0, 2.0]), None, "dtype"),
    ("2-d", torch.tensor([[1], [2]]), None, "shape"),
    ("scalar", torch.tensor(3), None, "shape"),
    ("batch 0", torch.zeros(0, dtype=torch.int64), None, "shape"),
    ("batch mismatch", torch.tensor([1, 2, 3]), 4, "shape"),
]


@pytest.mark.parametrize(("name", "labels", "batch", "reason"), BAD_LABELS,
                         ids=[r[0] for r in BAD_LABELS])
def test_check_labels_rejects(name: str, labels: torch.Tensor | None, batch: int | None,
                              reason: str) -> None:
    """Labels missing, not int64 (B,), of another batch or outside 0..9 raise MessageError."""
    with pytest.raises(MessageError) as err:
        check_labels(labels, batch)
    assert err.value.reason == reason


def test_check_labels_accepts_every_class() -> None:
    """int64 labels covering 0..9 pass, with and without a batch to match."""
    labels = torch.arange(10)
    assert check_labels(labels) is labels
    assert check_labels(labels, 10) is labels
