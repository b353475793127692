"""What ``import inferpool`` offers is exactly what ``__all__`` says, and every error is an InferpoolError."""

from __future__ import annotations

import inspect

import inferpool
from inferpool import client, model_registry, scheduler, workers


def test_all_is_what_is_exported() -> None:
    public = {name for name in dir(inferpool) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(inferpool, name))}
    assert set(inferpool.__all__) - {"__version__"} == public - modules


def test_subpackage_all_names_exist() -> None:
    for package in (client, model_registry, scheduler, workers):
        for name in package.__all__:
            assert hasattr(package, name), f"{package.__name__}.{name}"


def test_every_exported_exception_is_an_inferpool_error() -> None:
    errors = [obj for obj in vars(inferpool).values() if inspect.isclass(obj) and issubclass(obj, Exception)]
    assert len(errors) >= 10
    assert all(issubclass(err, inferpool.InferpoolError) for err in errors)
