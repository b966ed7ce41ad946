"""Every run leaves its network: model.pt under the user's own module names, loaded by plain
PyTorch in a fresh process, by zdni.load, and scored by zdni.evaluate / `zdni evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import zdni
from zdni.data import read_idx
from zdni.modelfile import ModelFileError, assemble, renormalize

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """MNIST as a user's .npz of uint8 images (1024 to train on, 500 to test)."""
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    x = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")[:1024, None]
    y = read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")[:1024].astype(np.int64)
    xt = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:500, None]
    yt = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:500].astype(np.int64)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def test_stage_states_are_renamed_to_the_users_modules() -> None:
    """Stage s's unit j is the network's unit cut[s] + j, under the child's own name; M, I and
    optimizer states stay out of the model."""
    net = nn.Sequential(OrderedDict(flat=nn.Flatten(), hidden=nn.Sequential(nn.Linear(4, 3)),
                                    norm=nn.BatchNorm1d(3), out=nn.Linear(3, 2)))
    sd = net.state_dict()
    states = {1: ({"stage.1.0.weight": sd["hidden.0.weight"], "stage.1.0.bias": sd["hidden.0.bias"],
                   "M.0.weight": torch.zeros(1), "opt.stage.0.exp_avg": torch.zeros(1)}, {}),
              2: ({f"stage.0.{k[5:]}": v for k, v in sd.items() if k.startswith("norm.")}
                  | {"stage.1.weight": sd["out.weight"], "stage.1.bias": sd["out.bias"]}, {})}
    whole = assemble(states, [0, 2], ["flat", "hidden", "norm", "out"])
    assert list(whole) == list(sd)
    nn.Sequential(OrderedDict((k, m) for k, m in net.named_children())).load_state_dict(whole)


def test_renormalize_moves_inputs_between_two_preparations() -> None:
    """Inputs prepared with one data set's statistics come out as training prepared them."""
    raw = torch.tensor([[0.0, 128.0, 255.0]])
    a = {"scale": 255.0, "mean": 0.1307, "std": 0.3081}
    b = {"scale": 255.0, "mean": 0.2, "std": 0.5}
    torch.testing.assert_close(renormalize((raw / 255 - 0.1307) / 0.3081, a, b),
                               (raw / 255 - 0.2) / 0.5)
    x = torch.randn(2, 3)
    assert renormalize(x, a, a) is x and renormalize(x, None, b) is x


def test_in_process_train_returns_the_network_load_and_evaluate_agree(
        digits: Path, tmp_path: Path, repo_root: Path, mnist_dir: Path) -> None:
    """zdni.train gives the summary (dict access kept) and .model; zdni.load rebuilds the same
    network from the file reference, normalization included (raw uint8 in, same logits);
    zdni.evaluate scores the summary's accuracy on the .npz, and the same images read by the
    MNIST reader (other statistics) score the same; a misfit data set is one line."""
    model = f"{repo_root}/examples/my_models.py:cnn"
    result = zdni.train(model, dataset=str(digits), distributed=False, mode="sg",
                        conditioned=True, stages=3, epochs=1, batch_size=64,
                        model_args={"channels": 4}, out_dir=str(tmp_path / "run"))
    assert result["test_accuracy"] == result.summary["test_accuracy"] > 0.6  # 0.666 measured
    assert isinstance(result.summary, dict) and json.loads(json.dumps(result))
    loaded = zdni.load(result.run_dir)
    with np.load(digits) as arrays:
        x_raw = torch.from_numpy(arrays["x_test"])
    torch.testing.assert_close(loaded(x_raw), result.model(x_raw))
    assert set(torch.load(tmp_path / "run" / "model.pt", weights_only=True)) == \
        set(loaded.net.state_dict())
    assert zdni.evaluate(loaded, str(digits))["accuracy"] == result["test_accuracy"]
    mnist = zdni.evaluate(result.run_dir, "mnist", data_dir=str(mnist_dir), limit=500)
    assert mnist["samples"] == 500
    assert abs(mnist["accuracy"] - result["test_accuracy"]) <= 0.004  # float rounding at most
    np.savez(tmp_path / "colour.npz", x_train=np.zeros((4, 3, 8, 8), np.uint8),
             y_train=np.arange(4), x_test=np.zeros((4, 3, 8, 8), np.uint8), y_test=np.arange(4))
    with pytest.raises(ModelFileError, match=r"samples of shape \(3, 8, 8\).*takes \(1, 28, 28\)"):
        zdni.evaluate(loaded, str(tmp_path / "colour.npz"))


PLAIN_TORCH = """
import importlib.util, json, sys
sys.modules["zdni"] = None  # any import of zdni now fails: torch (and numpy) alone
import numpy as np
import torch

run, data, test_limit = sys.argv[1], sys.argv[2], sys.argv[3]
info = json.load(open(f"{run}/model.json"))
path, factory = info["model"].rsplit(":", 1)
spec = importlib.util.spec_from_file_location("user_models", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
net = getattr(module, factory)(**info["model_args"])
net.load_state_dict(torch.load(f"{run}/model.pt", weights_only=True))
net.eval()
arrays = np.load(data)
limit = None if test_limit == "None" else int(test_limit)
x = torch.from_numpy(arrays["x_test"][:limit]).float()
y = torch.from_numpy(arrays["y_test"][:limit])
norm = info["normalization"]
x = (x / norm["scale"] - torch.tensor(norm["mean"])) / torch.tensor(norm["std"])
with torch.no_grad():
    accuracy = (net(x).argmax(1) == y).float().mean().item()
print(json.dumps({"accuracy": accuracy, "zdni": "zdni" in sys.modules and
                  sys.modules["zdni"] is not None}))
"""


def test_distributed_user_model_loads_in_plain_pytorch(digits: Path, tmp_path: Path,
                                                       repo_root: Path) -> None:
    """A user's CNN from examples/my_models.py, trained through 3 workers with cDNI, loads in
    a fresh Python process with torch alone (zdni cannot be imported there) and scores the
    summary's test accuracy to 0.1 points."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "zdni", "train", "--model", "examples/my_models.py:cnn",
         "--model-arg", "channels=4", "--dataset", str(digits), "--mode", "sg", "--conditioned",
         "--stages", "3", "--epochs", "1", "--batch-size", "64", "--quiet", "--threads", "1",
         "--out", str(run)], cwd=repo_root, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["runner"] == "zdni" and summary["stages"] == 3
    info = json.loads((run / "model.json").read_text())
    assert info["cuts"] and info["normalization"]["scale"] == 255.0 and info["classes"] == 10
    plain = subprocess.run([sys.executable, "-c", PLAIN_TORCH, str(run), str(digits),
                            str(info["test_limit"])], cwd=repo_root, capture_output=True,
                           text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert plain.returncode == 0, plain.stderr[-2000:]
    got = json.loads(plain.stdout)
    assert not got["zdni"]
    assert abs(got["accuracy"] - summary["test_accuracy"]) <= 0.001


FACTORY = '''
import torch
from torch import nn
from torch.utils.data import Dataset


def net():
    return nn.Sequential(nn.Sequential(nn.Linear(4, 16), nn.ReLU()),
                         nn.Sequential(nn.Linear(16, 3)))


def _part(n, shift, seed):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return x + shift, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


class Lazy(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make(n=256, shift=0.0, lazy=False):
    test = _part(n // 2, shift, 1)
    return _part(n, 0.0, 0), Lazy(*test) if lazy else test
'''


def test_evaluate_scores_the_run_s_own_data_set_with_its_factory_s_arguments(
        tmp_path: Path) -> None:
    """`zdni evaluate RUN_DIR` takes the run's own data set and factory arguments (model.json)
    and scores the summary's test accuracy; --dataset-arg changes the arguments it names and
    keeps the run's others (a Dataset read lazily scores the same; shifted inputs score
    otherwise); --dataset names another data set."""
    from click.testing import CliRunner

    from zdni.cli import main

    (tmp_path / "gen.py").write_text(FACTORY)
    run = tmp_path / "run"
    out = CliRunner().invoke(main, [
        "train", "--inproc", "--quiet", "--threads", "1", "--model", f"{tmp_path}/gen.py:net",
        "--dataset", f"{tmp_path}/gen.py:make", "--dataset-arg", "n=200", "--stages", "2",
        "--epochs", "2", "--batch-size", "20", "--lr", "0.01", "--out", str(run)])
    assert out.exit_code == 0, out.output
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "model.json").read_text())["dataset_args"] == {"n": 200}

    def evaluate(*args: str) -> dict:
        out = CliRunner().invoke(main, ["evaluate", str(run), *args])
        assert out.exit_code == 0, out.output
        return json.loads(out.output)

    own = evaluate()
    assert own["samples"] == 100 and own["accuracy"] == pytest.approx(
        summary["test_accuracy"], abs=1e-6) and own["accuracy"] > 0.5
    lazy = evaluate("--dataset-arg", "lazy=true", "--batch-size", "7")
    assert lazy["samples"] == 100 and lazy["accuracy"] == pytest.approx(own["accuracy"])
    assert lazy["loss"] == pytest.approx(own["loss"], rel=1e-5)
    assert evaluate("--dataset-arg", "shift=3")["accuracy"] < own["accuracy"] - 0.1
    other = evaluate("--dataset", f"{tmp_path}/gen.py:make", "--dataset-arg", "n=60")
    assert other["samples"] == 30


def test_model_json_names_files_by_absolute_paths(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A run given relative files (model factory, data set, data directory) records them
    absolute, so `zdni evaluate RUN_DIR` finds them from any directory; names stay names."""
    from zdni.modelfile import anchored

    (tmp_path / "net.py").write_text("def f():\n    pass\n")
    (tmp_path / "data.npz").write_bytes(b"")
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    assert anchored("net.py:f") == f"{tmp_path}/net.py:f"
    assert anchored("data.npz") == f"{tmp_path}/data.npz"
    assert anchored("mnist", folder=True) == f"{tmp_path}/mnist"  # --data-dir's folder
    assert anchored("mnist") == "mnist"  # the data set's name, though a folder is called so
    for name in ("fcn3", "cifar10", "package.module:factory", "missing.py:f", ""):
        assert anchored(name) == name
