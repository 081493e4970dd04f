"""The node's template build layer cache: least recently used layers go first, a layer's descendants go with it,
and a layer a builder VM stands on now stays."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

from services.compute.layers import Layers


def key(n: int) -> str:
    return f"{n:064x}"


def layers_at(tmp_path: Path, vms=()) -> Layers:
    lifecycle = SimpleNamespace(driver=SimpleNamespace(disk_format="qcow2"), ledger=SimpleNamespace(vms=dict(vms)))
    return Layers(lifecycle, tmp_path / "layers")


def make(layers: Layers, n: int, parent: int | None, age_seconds: float, size: int = 4096) -> None:
    layers.root.mkdir(parents=True, exist_ok=True)
    layers.path(key(n)).write_bytes(os.urandom(size))
    meta = layers.path(key(n)).with_name(f"{key(n)}.json")
    meta.write_text(json.dumps({"parent": key(parent) if parent is not None else "", "base": "/base"}))
    then = time.time() - age_seconds
    os.utime(meta, (then, then))


def present(layers: Layers) -> set[int]:
    return {int(p.stem, 16) for p in layers.root.glob("*.qcow2")}


def test_old_layers_go_with_their_descendants_and_recent_ones_stay(tmp_path):
    layers = layers_at(tmp_path)
    make(layers, 1, None, age_seconds=30 * 86400)
    make(layers, 2, 1, age_seconds=60)  # recent, but stands on an old one: it cannot outlive it
    make(layers, 3, None, age_seconds=60)
    dropped = layers.prune(max_bytes=1 << 40, max_age_seconds=14 * 86400)
    assert sorted(int(k, 16) for k in dropped) == [1, 2]
    assert present(layers) == {3}
    assert layers.usable(key(3)) and not layers.usable(key(2))


def test_over_the_size_bound_the_least_recently_used_go_first(tmp_path):
    layers = layers_at(tmp_path)
    for n, age in ((1, 300), (2, 200), (3, 100)):
        make(layers, n, None, age_seconds=age, size=1 << 20)
    layers.find([key(1)], base_image="")  # used just now: the most recent
    layers.prune(max_bytes=2 << 20, max_age_seconds=86400)
    assert present(layers) == {1, 3}


def test_a_layer_a_builder_stands_on_is_kept(tmp_path):
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    (vm_dir / "layer-parent").write_text(json.dumps({"parent": key(2), "base": "/base"}))
    layers = layers_at(tmp_path, {"bld-b000000000000-1": SimpleNamespace(directory=str(vm_dir))})
    make(layers, 1, None, age_seconds=30 * 86400)
    make(layers, 2, 1, age_seconds=30 * 86400)
    make(layers, 3, None, age_seconds=30 * 86400)
    layers.prune(max_bytes=0, max_age_seconds=0)
    assert present(layers) == {1, 2}


def test_a_layer_stands_only_on_the_base_build_it_was_made_on(tmp_path):
    """Same path, same recipe hash, another mkfs: the base's filesystem id tells the builds apart."""
    layers = layers_at(tmp_path)
    layers.root.mkdir(parents=True)
    layers.path(key(1)).write_bytes(b"layer")
    meta = {"parent": "", "base": "/images/default/abc/rootfs.ext4", "base_id": "11" * 16}
    layers.path(key(1)).with_name(f"{key(1)}.json").write_text(json.dumps(meta))
    base = SimpleNamespace(rootfs=Path(meta["base"]), rootfs_id="11" * 16)
    assert layers.usable(key(1), base)
    assert not layers.usable(key(1), SimpleNamespace(rootfs=base.rootfs, rootfs_id="22" * 16))  # built again
    assert not layers.usable(key(1), SimpleNamespace(rootfs=Path("/images/default/def/rootfs.ext4"), rootfs_id=""))
