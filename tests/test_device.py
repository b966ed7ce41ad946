"""Device specs: cpu, core sets and cuda:N parsed and checked (pure), and a real pinning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest

from zdni.device import DeviceError, parse, parse_list

CORES = {0, 1, 2, 3}


@pytest.mark.parametrize("text,device,cores", [
    ("cpu", "cpu", ()),
    ("cpu:1", "cpu", (1,)),
    ("cpu:0-2", "cpu", (0, 1, 2)),
    ("cpu:3,0-1", "cpu", (0, 1, 3)),
    ("cuda:0", "cuda:0", ()),
])
def test_device_specs(text: str, device: str, cores: tuple[int, ...]) -> None:
    """Each spec gives its torch device and its pinned cores (one thread per core)."""
    spec = parse(text, CORES)
    assert (spec.torch_device, spec.cores) == (device, cores)
    assert spec.threads == (len(cores) or None)


@pytest.mark.parametrize("text,message", [
    ("cpu:4-5", "cores [4, 5] are not among this machine's usable cores 0-3"),
    ("cpu:2-1", "runs backwards"),
    ("gpu", "expected cpu, cpu:A-B"),
    ("cuda:x", "expected cpu, cpu:A-B"),
])
def test_bad_device_specs_say_what_is_allowed(text: str, message: str) -> None:
    """A spec that cannot be used here is a DeviceError saying why."""
    with pytest.raises(DeviceError, match=re.escape(message)):
        parse(text, CORES)


def test_one_device_per_stage() -> None:
    """--devices gives one spec per stage; a wrong count says how to write it."""
    assert [s.cores for s in parse_list("cpu:0 cpu:1;cpu:2-3", 3, CORES)] == [(0,), (1,), (2, 3)]
    with pytest.raises(DeviceError, match="names 2 devices for 3 stages"):
        parse_list("cpu:0 cpu:1", 3, CORES)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_a_pinned_process_runs_on_its_cores_with_a_thread_each() -> None:
    """apply() pins the process and sets torch's threads to the core count."""
    core = sorted(os.sched_getaffinity(0))[0]
    code = ("import os, torch; from zdni.device import parse, apply; "
            f"apply(parse('cpu:{core}')); "
            "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == [f"[{core}]", "1"], out.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("one_thread")
def test_train_places_each_stage_on_its_cores(mnist_dir, redis_url, redis_client) -> None:
    """--devices 'cpu:A cpu:B cpu:A': each worker runs pinned where its stage was placed (its
    heartbeat says so), and the caller's own affinity is given back after the run."""
    from zdni import keys
    from zdni.cluster import train_distributed
    from zdni.config import RunConfig

    first, last = sorted(os.sched_getaffinity(0))[0], sorted(os.sched_getaffinity(0))[-1]
    before = os.sched_getaffinity(0)
    cfg = RunConfig(run_id="placed", data_dir=str(mnist_dir), epochs=1, train_limit=640,
                    test_limit=500, batch_size=64).validate()
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url,
                                devices=f"cpu:{first} cpu:{last};cpu:{first}")
    assert summary["iterations"] == 10
    cores = [redis_client.hget(keys.heartbeat("placed", s), "cores") for s in (1, 2, 3)]
    assert cores == [str(first).encode(), str(last).encode(), str(first).encode()]
    assert os.sched_getaffinity(0) == before


@pytest.mark.cuda
@pytest.mark.timeout(240)
def test_a_distributed_run_on_cuda_equals_the_reference(mnist_dir, redis_url,
                                                        redis_client) -> None:
    """Every stage on cuda:0 (--devices), backprop with one batch in flight: the workers end
    with plain PyTorch's parameters (on the CPU, within float tolerance of GPU kernels)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from procs import batches, worker_state

    from zdni.cluster import train_distributed
    from zdni.config import RunConfig
    from zdni.models import build_stages

    cfg = RunConfig(run_id="on-cuda", data_dir=str(mnist_dir), mode="backprop", epochs=1,
                    train_limit=640, test_limit=500, batch_size=64, max_inflight=1,
                    checkpoint_every=0).validate()
    summary = train_distributed(cfg, quiet=True, redis_url=redis_url,
                                devices="cuda:0 cuda:0 cuda:0")
    assert summary["iterations"] == 10
    model = torch.nn.Sequential(*build_stages(cfg)).to("cuda:0")  # the same GPU kernels
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    for xb, yb in batches(cfg):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb.cuda()), yb.cuda()).backward()
        opt.step()
    for s, stage in enumerate(model, start=1):
        got = worker_state(redis_client, cfg.run_id, s)
        skip = absorbed_by_batchnorm(stage)
        for name, value in stage.state_dict().items():
            if name not in skip:
                torch.testing.assert_close(got[f"stage.{name}"], value.cpu(), rtol=1e-3,
                                           atol=1e-4, msg=f"stage {s} {name}")


def absorbed_by_batchnorm(module: Any) -> set[str]:
    """Names of the Linear biases right before a BatchNorm, and of that BatchNorm's running
    mean: the bias's true gradient is exactly zero, so Adam turns the GPU's rounding noise in it
    (+-1e-9, reduced in another order) into +-lr steps that BatchNorm then cancels; comparing
    them would compare noise. Every other parameter and statistic is compared."""
    from torch import nn

    out = set()
    for prefix, parent in module.named_modules():
        children = list(parent.named_children())
        for (a, first), (b, second) in zip(children, children[1:]):
            if isinstance(first, nn.Linear) and isinstance(second, nn.BatchNorm1d):
                base = f"{prefix}." if prefix else ""
                out |= {f"{base}{a}.bias", f"{base}{b}.running_mean"}
    return out


def test_to_host_passes_cpu_tensors_through() -> None:
    """Without a GPU tensor nothing is copied: the worker's send path is unchanged on CPUs."""
    import torch

    from zdni.device import to_host

    t = torch.randn(3, 4)
    assert to_host({"h": t, "n": 3})["h"] is t


needs_cuda = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_gpu_tensors_cross_the_wire_through_pinned_memory() -> None:
    """to_host lands GPU tensors in pinned host memory with their values; a message decoded
    for a GPU worker is pinned, so its copy to the GPU does not block."""
    import torch

    from zdni.codec import Message, decode, encode
    from zdni.device import to_host

    h, g = torch.randn(64, 256, device="cuda"), torch.randn(64, 128, device="cuda")
    host = to_host({"h": h, "g": g})
    assert all(t.device.type == "cpu" and t.is_pinned() for t in host.values())
    assert torch.equal(host["h"], h.cpu()) and torch.equal(host["g"], g.cpu())
    msg = decode(encode(Message("act", "r", 0, 1, 2, {"h": host["h"]})), pin_memory=True)
    assert msg.tensors["h"].is_pinned() and torch.equal(msg.tensors["h"], h.cpu())


@pytest.mark.cuda
@needs_cuda
def test_a_backup_restores_onto_another_device() -> None:
    """A stage backed up on cuda:0 restores onto the CPU and back (the map_location case: a
    restarted worker may get another device), parameters and Adam state alike."""
    import torch

    from zdni.checkpoint import restore_stage, stage_state
    from zdni.config import RunConfig
    from zdni.models import build_stages, input_shape, stage_shapes
    from zdni.stage import Stage

    cfg = RunConfig(mode="sg", conditioned=True, stages=3).validate()
    torch.manual_seed(0)
    modules = build_stages(cfg)
    shapes = stage_shapes(modules, input_shape(cfg))
    on_gpu = Stage(cfg, 2, modules[1], shapes, device="cuda:0")
    h, y = torch.randn(32, *shapes[1]), torch.randint(0, 10, (32,))
    for it in range(3):
        on_gpu.train_input(it, h, y)
        on_gpu.train_grad(it, torch.randn(32, *shapes[2]))
    tensors, meta = stage_state(on_gpu, 3)
    assert all(t.device.type == "cpu" for t in tensors.values())
    torch.manual_seed(1)
    on_cpu = Stage(cfg, 2, build_stages(cfg)[1], shapes, device="cpu")
    restore_stage(on_cpu, tensors, meta)
    for (name, a), b in zip(on_gpu.module.state_dict().items(), on_cpu.module.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b), name
    assert on_cpu.opt is not None and on_gpu.opt is not None
    state = next(iter(on_cpu.opt.state.values()))
    assert state["exp_avg"].device.type == "cpu"
    back = Stage(cfg, 2, build_stages(cfg)[1], shapes, device="cuda:0")
    restore_stage(back, *stage_state(on_cpu, 3))
    assert back.opt is not None
    assert next(iter(back.opt.state.values()))["exp_avg"].device.type == "cuda"
    out_a = on_gpu.evaluate(h)
    torch.testing.assert_close(back.evaluate(h), out_a)


@pytest.mark.cuda
@needs_cuda
def test_a_gpu_stage_trains_m_from_a_slot_read_back_from_redis(redis_client) -> None:
    """After a restart the 'out' ring's slots come from Redis, on the CPU: M on the GPU still
    trains on them (the slot is moved to M's device)."""
    import torch

    from zdni.buffer import RedisRing
    from zdni.config import RunConfig
    from zdni.models import build_stages, input_shape, stage_shapes
    from zdni.stage import Stage

    cfg = RunConfig(mode="sg", conditioned=True, stages=3).validate()
    modules = build_stages(cfg)
    shapes = stage_shapes(modules, input_shape(cfg))
    rings = {name: RedisRing(redis_client, "gpu-ring", 1, name, cfg.ring_size)
             for name in ("out", "in")}
    stage = Stage(cfg, 1, modules[0], shapes, rings, device="cuda:0")
    stage.train_input(0, torch.randn(16, *shapes[0]), torch.randint(0, 10, (16,)))
    rings["out"].local.clear()  # as a restarted worker: only Redis has the slot
    out = stage.train_grad(0, torch.randn(16, *shapes[1]))
    assert out.metrics["grad_loss"] > 0


def test_the_batchnorm_absorbed_names_are_found() -> None:
    """The helper above names exactly fcn3's pre-BatchNorm biases and running means."""
    from zdni.config import RunConfig
    from zdni.models import build_stages

    stages = build_stages(RunConfig(stages=3).validate())
    assert absorbed_by_batchnorm(stages[0]) == {"0.1.bias", "0.2.running_mean"}
    assert absorbed_by_batchnorm(stages[2]) == set()
