"""images/cache.py: a stage is built once, whole or not at all, even when two builders want it at once."""

from __future__ import annotations

import threading
import time

import pytest

from images.cache import stage, write_pointer


def test_concurrent_builders_of_one_stage_build_it_once_and_both_get_it(tmp_path):
    calls = []

    def build(work):
        calls.append(work)
        time.sleep(0.3)  # the other builder arrives meanwhile
        (work / "payload").write_text("built")

    directory = tmp_path / "stage" / "key"
    results = []
    threads = [threading.Thread(target=lambda: results.append(stage(directory, build))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [directory, directory] and len(calls) == 1
    assert (directory / "payload").read_text() == "built" and (directory / ".complete").exists()


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    def build(work):
        (work / "half").write_text("x")
        raise RuntimeError("interrupted")

    directory = tmp_path / "stage" / "key"
    with pytest.raises(RuntimeError):
        stage(directory, build)
    assert not directory.exists()
    assert [p.name for p in directory.parent.iterdir()] == [".key.lock"]


def test_a_pointer_is_replaced_whole(tmp_path):
    pointer = tmp_path / "current"
    write_pointer(pointer, "a\n")
    write_pointer(pointer, "b\n")
    assert pointer.read_text() == "b\n" and [p.name for p in tmp_path.iterdir()] == ["current"]
