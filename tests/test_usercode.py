"""References to user code: resolving, calling, the worker's allow rule, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from zdni.config import ConfigError, RunConfig
from zdni.models import build_units
from zdni.usercode import UserCodeError, check_allowed, is_reference, parse_args, resolve, tag


def test_reference_forms() -> None:
    """module:factory and file.py:factory are references; zoo names and data files are not."""
    assert is_reference("pkg.mod:make") and is_reference("dir/my models.py:net_2")
    assert not any(is_reference(t) for t in ("fcn3", "mnist", "data.npz", "a:b:c", ":f", "m:1x"))


def test_run_ids_take_the_factory_name() -> None:
    """A generated run id stays valid whatever the reference looks like."""
    assert tag("some/dir/my-models.py:cnn") == "cnn"
    assert tag("/data/set v2.npz") == "set_v2"


@pytest.mark.parametrize("ref,message", [
    ("no_such_module_zdni:f", "no module named 'no_such_module_zdni'"),
    ("json:nope", "json has no attribute 'nope'"),
    ("json:__doc__", "not a callable"),
    ("missing/file.py:f", "no file missing/file.py"),
])
def test_bad_references_name_themselves(ref: str, message: str) -> None:
    """Each bad reference raises UserCodeError naming the reference and the problem."""
    with pytest.raises(UserCodeError, match=message) as info:
        resolve(ref)
    assert str(info.value).startswith(ref) and "\n" not in str(info.value)


def test_a_file_that_fails_to_import_and_factories_that_misbehave(tmp_path: Path) -> None:
    """Import errors, raising factories and wrong return types are one-line UserCodeErrors."""
    (tmp_path / "broken.py").write_text("import no_such_thing_zdni\n")
    with pytest.raises(UserCodeError, match="importing .*broken.py raised ModuleNotFoundError"):
        resolve(f"{tmp_path}/broken.py:f")
    (tmp_path / "m.py").write_text("def boom(**kw):\n    raise ValueError('bad width')\n"
                                   "def five():\n    return 5\n")
    with pytest.raises(UserCodeError, match="the factory raised ValueError: bad width"):
        build_units(f"{tmp_path}/m.py:boom", {"width": 3})
    with pytest.raises(UserCodeError, match="returned a int; expected an nn.Sequential"):
        build_units(f"{tmp_path}/m.py:five")


def test_model_args_are_json_where_they_parse() -> None:
    """--model-arg values: JSON numbers, lists and booleans, else strings."""
    assert parse_args(["width=64", "sizes=[1,2]", "act=relu", "bn=true"]) == {
        "width": 64, "sizes": [1, 2], "act": "relu", "bn": True}
    with pytest.raises(UserCodeError, match="not KEY=VALUE"):
        parse_args(["=3"])


def test_a_worker_imports_only_what_its_operator_named() -> None:
    """A run naming code is refused unless the worker was started naming the same code."""
    check_allowed("fcn3", None, "[stage 1]")  # the zoo needs no allowing
    check_allowed("a.py:f", "a.py:f", "[stage 1]")
    for allowed in (None, "b.py:f"):
        with pytest.raises(UserCodeError, match=r"start the worker with --model a.py:f"):
            check_allowed("a.py:f", allowed, "[stage 1]")


def test_config_accepts_references_and_data_files_only() -> None:
    """model and dataset take zoo names, references or data files; anything else is named."""
    RunConfig(model="x.py:f", dataset="d.npz").validate()
    RunConfig(model="pkg.mod:f", dataset="pkg.data:load").validate()
    with pytest.raises(ConfigError, match="neither a zoo model"):
        RunConfig(model="resnet").validate()
    with pytest.raises(ConfigError, match="dataset 'x.csv' is not"):
        RunConfig(dataset="x.csv").validate()
