"""Test modules are imported by their basename (the test directories are not packages): two files of one name in
different directories stop the whole run at collection, so each name is used once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_name_is_used_once():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
