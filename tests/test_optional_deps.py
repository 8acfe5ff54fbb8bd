"""A missing optional dependency is reported with the pip extra that installs it (`pyops[methods]`,
`[hf]`, `[fl]`), not as a bare ModuleNotFoundError. A package is made missing by a None entry in
sys.modules, which makes its import raise ModuleNotFoundError as an absent package does."""

import importlib
import sys

import pytest

from pyops._optional import MissingOptionalDependency, requires


def block(monkeypatch, *names):
    for name in names:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, name, None)


def test_requires_names_the_extra_and_the_module(monkeypatch):
    block(monkeypatch, "some_absent_pkg")
    with pytest.raises(MissingOptionalDependency, match=r"'some_absent_pkg'.*pip install 'pyops\[hf\]'") as e:
        with requires("hf"):
            import some_absent_pkg  # noqa: F401
    assert isinstance(e.value, ImportError) and e.value.name == "some_absent_pkg"
    assert isinstance(e.value.__cause__, ModuleNotFoundError)


def test_requires_lets_other_errors_through():
    with pytest.raises(ImportError, match="broken") as e:
        with requires("methods"):
            raise ImportError("broken install")  # not a missing module: unchanged
    assert not isinstance(e.value, MissingOptionalDependency)
    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        with requires("nope"):
            pass


def test_fedgh_data_without_sklearn(monkeypatch):
    from methods.fedgh import data

    block(monkeypatch, "sklearn")
    with pytest.raises(MissingOptionalDependency, match=r"'sklearn'.*pyops\[methods\]"):
        data.load_dataset("digits")


def test_tokenizer_without_tokenizers(monkeypatch):
    from methods.common.text import word_tokenizer

    block(monkeypatch, "tokenizers")
    with pytest.raises(MissingOptionalDependency, match=r"'tokenizers'.*pyops\[hf\]"):
        word_tokenizer(["<pad>"], ["a", "b"])


def test_flower_app_without_flwr(monkeypatch):
    block(monkeypatch, "flwr")
    monkeypatch.delitem(sys.modules, "methods.fedgh.flower_app", raising=False)
    with pytest.raises(MissingOptionalDependency, match=r"Flower deployment of FedGH.*'flwr'.*pyops\[fl\]"):
        importlib.import_module("methods.fedgh.flower_app")
