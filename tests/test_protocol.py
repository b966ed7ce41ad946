"""Tests of zdni.protocol: the routing table and the broker's outbound addresses."""

from __future__ import annotations

import pytest

from zdni import protocol
from zdni.protocol import (
    ACT,
    BATCH,
    CONTROL,
    DONE,
    DRIVER,
    ENDPOINTS,
    EVAL,
    EVAL_RESULT,
    FAIL,
    GRAD,
    KINDS,
    MAX_STAGES,
    PING,
    SYNTH,
    SYNTH_REP,
    SYNTH_REQ,
    outbound_address,
    route,
)

# (kind, src, dst, stages, where it goes)
LEGAL = [
    (PING, DRIVER, DRIVER, 3, DRIVER),  # a ping comes back to its sender
    (PING, 2, 2, 3, 2),
    (ACT, 1, 2, 3, 2),
    (ACT, 2, 3, 3, 3),
    (ACT, 15, 16, MAX_STAGES, 16),
    (GRAD, 3, 2, 3, 2),
    (GRAD, 2, 1, 3, 1),
    (BATCH, DRIVER, 1, 3, 1),
    (BATCH, DRIVER, 3, 3, 3),
    (CONTROL, DRIVER, 2, 3, 2),
    (EVAL, DRIVER, 1, 3, 1),
    (EVAL, 1, 2, 3, 2),
    (EVAL, 2, 3, 3, 3),
    (DONE, 1, DRIVER, 3, DRIVER),
    (DONE, 3, DRIVER, 3, DRIVER),
    (EVAL_RESULT, 3, DRIVER, 3, DRIVER),
    (SYNTH_REQ, 2, SYNTH, 3, SYNTH),
    (SYNTH_REP, SYNTH, 2, 3, 2),
    (BATCH, DRIVER, 1, 1, 1),  # a one-stage run
    (DONE, 1, DRIVER, 1, DRIVER),
    (FAIL, 2, DRIVER, 3, DRIVER),  # a stage that cannot go on tells the driver
    (FAIL, SYNTH, DRIVER, 3, DRIVER),
]

# (kind, src, dst, stages, a word the error must contain)
ILLEGAL = [
    (PING, DRIVER, 1, 3, "goes back to its sender"),
    (PING, 4, 4, 3, "not an endpoint"),
    (ACT, 3, 4, 3, "act from 3"),  # the last stage has nobody to send activations to
    (ACT, DRIVER, 1, 3, "act from 0"),
    (ACT, 1, 3, 3, "act 1->3"),  # activations go exactly one stage forward
    (ACT, 1, DRIVER, 3, "act 1->0"),
    (ACT, 1, 2, 1, "act from 1"),  # a one-stage run has no activations on the wire
    (GRAD, 1, DRIVER, 3, "grad from 1"),  # stage 1 has no upstream to send gradients to
    (GRAD, DRIVER, 1, 3, "grad from 0"),
    (GRAD, 4, 3, 3, "grad from 4"),  # a stage the run does not have
    (GRAD, 3, 1, 3, "grad 3->1"),  # gradients go exactly one stage back
    (BATCH, 1, 2, 3, "driver"),  # a batch not from the driver
    (BATCH, SYNTH, 1, 3, "driver"),
    (BATCH, DRIVER, DRIVER, 3, "driver"),
    (BATCH, DRIVER, 4, 3, "driver"),  # a stage out of range
    (CONTROL, 2, 3, 3, "driver"),
    (CONTROL, DRIVER, 0, 3, "driver"),
    (EVAL, DRIVER, 2, 3, "eval"),  # skipping stage 1
    (EVAL, 1, 3, 3, "eval"),  # skipping stage 2
    (EVAL, 3, 4, 3, "eval"),  # past the last stage
    (EVAL, 2, 1, 3, "eval"),  # backwards
    (DONE, DRIVER, DRIVER, 3, "done"),
    (DONE, 2, 3, 3, "done"),  # done goes to the driver only
    (DONE, 4, DRIVER, 3, "done"),
    (EVAL_RESULT, 3, 1, 3, "eval_result"),
    (FAIL, 2, 1, 3, "fail"),  # a failure goes to the driver only
    (FAIL, DRIVER, DRIVER, 3, "fail"),
    (FAIL, 4, DRIVER, 3, "fail"),
    (SYNTH_REQ, DRIVER, SYNTH, 3, "synth_req"),
    (SYNTH_REQ, 2, DRIVER, 3, "synth_req"),
    (SYNTH_REQ, 2, 3, 3, "synth_req"),
    (SYNTH_REQ, SYNTH, SYNTH, 3, "synth_req"),
    (SYNTH_REP, 2, 3, 3, "synth_rep"),  # only the synthesizer replies
    (SYNTH_REP, SYNTH, DRIVER, 3, "synth_rep"),
    (SYNTH_REP, SYNTH, 4, 3, "synth_rep"),
    ("bogus", 1, 2, 3, "unknown kind"),
    ("", DRIVER, 1, 3, "unknown kind"),
    ("ACT", 1, 2, 3, "unknown kind"),  # kinds are case-sensitive
    (BATCH, DRIVER, 1, 0, "stages"),  # stage counts out of range
    (BATCH, DRIVER, 1, MAX_STAGES + 1, "stages"),
    (ACT, 1, 2, -1, "stages"),
]


@pytest.mark.parametrize(("kind", "src", "dst", "stages", "to"), LEGAL)
def test_route_legal(kind: str, src: int, dst: int, stages: int, to: int) -> None:
    """Each legal kind/src/dst combination routes to the endpoint the table names."""
    assert route(kind, src, dst, stages) == to


@pytest.mark.parametrize(("kind", "src", "dst", "stages", "word"), ILLEGAL)
def test_route_illegal(kind: str, src: int, dst: int, stages: int, word: str) -> None:
    """An illegal combination, unknown kind or bad stage count raises ValueError saying why."""
    with pytest.raises(ValueError, match=word):
        route(kind, src, dst, stages)


def test_every_kind_has_a_legal_route() -> None:
    """The legal table covers every message kind, so no kind is left unrouted."""
    assert {row[0] for row in LEGAL} == KINDS


@pytest.mark.parametrize("stages", [1, 2, 5, MAX_STAGES])
def test_route_targets_stay_in_range(stages: int) -> None:
    """Over every endpoint pair, a routed message lands on an endpoint the run has."""
    valid = {DRIVER, SYNTH, *range(1, stages + 1)}
    for kind in sorted(KINDS):
        for src in range(ENDPOINTS):
            for dst in range(ENDPOINTS):
                try:
                    to = route(kind, src, dst, stages)
                except ValueError:
                    continue
                assert to == dst, (kind, src, dst)  # a routed message goes where its header says
                assert to in valid and src in valid, (kind, src, dst)


@pytest.mark.parametrize(
    ("broker", "endpoint", "address"),
    [
        ("tcp://127.0.0.1:5555", DRIVER, "tcp://127.0.0.1:5556"),
        ("tcp://127.0.0.1:5555", 3, "tcp://127.0.0.1:5559"),
        ("tcp://127.0.0.1:5555", SYNTH, f"tcp://127.0.0.1:{5556 + SYNTH}"),
        ("tcp://*:7000", 1, "tcp://*:7002"),
        ("tcp://[::1]:6000", 2, "tcp://[::1]:6003"),
        ("tcp://host.example:0", 0, "tcp://host.example:1"),
        (f"tcp://h:{65535 - ENDPOINTS}", ENDPOINTS - 1, "tcp://h:65535"),  # the highest that fits
        ("ipc:///tmp/zdni.sock", 0, "ipc:///tmp/zdni.sock.0"),
        ("ipc:///tmp/zdni.sock", SYNTH, f"ipc:///tmp/zdni.sock.{SYNTH}"),
    ],
)
def test_outbound_address(broker: str, endpoint: int, address: str) -> None:
    """tcp addresses take port+1+endpoint; ipc addresses take a .endpoint suffix."""
    assert outbound_address(broker, endpoint) == address


@pytest.mark.parametrize(
    ("broker", "endpoint", "word"),
    [
        ("tcp://127.0.0.1:5555", -1, "endpoint"),
        ("tcp://127.0.0.1:5555", ENDPOINTS, "endpoint"),
        ("tcp://127.0.0.1", 0, "HOST:PORT"),  # no port
        ("tcp://127.0.0.1:", 0, "HOST:PORT"),  # empty port
        ("tcp://127.0.0.1:55x5", 0, "HOST:PORT"),
        ("tcp://127.0.0.1:-5", 0, "HOST:PORT"),
        (f"tcp://127.0.0.1:{65535 - ENDPOINTS + 1}", ENDPOINTS - 1, "no room"),
        ("tcp://127.0.0.1:65535", 0, "no room"),
        ("tcp://127.0.0.1:99999", 0, "no room"),
        ("udp://127.0.0.1:5555", 0, "tcp:// or ipc://"),
        ("127.0.0.1:5555", 0, "tcp:// or ipc://"),
        ("", 0, "tcp:// or ipc://"),
        ("TCP://127.0.0.1:5555", 0, "tcp:// or ipc://"),
    ],
)
def test_outbound_address_rejects(broker: str, endpoint: int, word: str) -> None:
    """Bad addresses, ports that leave no room and endpoints out of range raise ValueError."""
    with pytest.raises(ValueError, match=word):
        outbound_address(broker, endpoint)


def test_outbound_ports_are_distinct() -> None:
    """Every endpoint gets its own port, none of them the inbound one."""
    ports = {outbound_address("tcp://127.0.0.1:20000", e) for e in range(ENDPOINTS)}
    assert len(ports) == ENDPOINTS
    assert "tcp://127.0.0.1:20000" not in ports
    assert protocol.ENDPOINTS == MAX_STAGES + 2
