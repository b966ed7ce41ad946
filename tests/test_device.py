"""Device specs: cpu, core sets and cuda:N parsed and checked (pure), and a real pinning."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
    model = torch.nn.Sequential(*build_stages(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for xb, yb in batches(cfg):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    for s, stage in enumerate(model, start=1):
        got = worker_state(redis_client, cfg.run_id, s)
        for name, value in stage.state_dict().items():
            torch.testing.assert_close(got[f"stage.{name}"].cpu(), value, rtol=1e-3, atol=1e-4,
                                       msg=f"stage {s} {name}")
