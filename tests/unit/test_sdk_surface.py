"""The SDK's public surface: the sync `Sandbox` mirrors `AsyncSandbox` (same methods, same keyword arguments), no
public method hides its arguments behind **kwargs, and every public class and method says what it does."""

from __future__ import annotations

import inspect

import pytest

import microvm_sandbox
from microvm_sandbox import (
    AsyncClient,
    AsyncDesktop,
    AsyncPortForward,
    AsyncRecording,
    AsyncSandbox,
    AsyncSnapshot,
    Client,
    Desktop,
    PortForward,
    Recording,
    Sandbox,
    Snapshot,
)

PAIRS = [
    (AsyncSandbox, Sandbox),
    (AsyncSnapshot, Snapshot),
    (AsyncPortForward, PortForward),
    (AsyncDesktop, Desktop),
    (AsyncRecording, Recording),
]
# What only one side has, and why: the sync side wraps the async one (`aio`, `wrap`), the async one binds messages
# and starts itself when awaited (`start`).
ONE_SIDED = {"aio", "wrap", "bound_to", "message", "client", "refresh", "start"}


def public(cls) -> dict[str, object]:
    return {
        name: member
        for klass in reversed(cls.__mro__)
        if klass.__module__.startswith("microvm_sandbox")
        for name, member in vars(klass).items()
        if not name.startswith("_")
    }


def parameters(member) -> list[str]:
    function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    if isinstance(function, property) or not callable(function):
        return []
    return [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]


@pytest.mark.parametrize("async_cls, sync_cls", PAIRS)
def test_the_sync_class_mirrors_the_async_one(async_cls, sync_cls):
    asynchronous, synchronous = public(async_cls), public(sync_cls)
    assert set(asynchronous) - ONE_SIDED - {"from_message", "delete", "restore"} <= set(synchronous)
    for name in set(asynchronous) & set(synchronous) - ONE_SIDED:
        theirs, ours = parameters(asynchronous[name]), parameters(synchronous[name])
        if sync_cls is Snapshot and name in ("restore", "delete"):
            theirs = [p for p in theirs if p != "client"]  # a sync snapshot keeps its client
        assert theirs == ours, name


def test_clients_mirror_each_other():
    asynchronous, synchronous = public(AsyncClient), public(Client)
    for name in ("list_sandboxes", "list_snapshots", "list_templates", "get_snapshot", "delete_snapshot", "close"):
        assert parameters(asynchronous[name]) == parameters(synchronous[name]), name


@pytest.mark.parametrize("cls", [cls for pair in PAIRS for cls in pair] + [AsyncClient, Client])
def test_no_public_method_takes_untyped_keyword_arguments_and_all_are_documented(cls):
    assert cls.__doc__
    for name, member in public(cls).items():
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if isinstance(function, property):
            assert function.fget.__doc__, f"{cls.__name__}.{name}"
            continue
        if not callable(function):
            continue
        assert function.__doc__, f"{cls.__name__}.{name}"
        kinds = {p.kind for p in inspect.signature(function).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{cls.__name__}.{name}"


def test_the_package_ships_its_types_marker():
    from importlib.resources import files

    assert files(microvm_sandbox).joinpath("py.typed").is_file()
    assert set(microvm_sandbox.__all__) <= set(dir(microvm_sandbox))
