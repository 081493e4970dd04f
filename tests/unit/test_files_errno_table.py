"""docs/files.md prints the one errno -> status table of the agent (errnos.ERRNO_STATUS): the two stay equal, and every
status in it has the SDK exception the doc names."""

from __future__ import annotations

import errno
import re

import grpc

from microvm_agent.errnos import ERRNO_STATUS, INTERNAL, os_error
from microvm_sandbox.errors import error_class
from tests.stack import REPO

ROW = re.compile(r"^\| (E[A-Z]+|any other) \| ([A-Z_]+) \| (\w+) \|$", re.M)


def documented() -> list[tuple[str, str, str]]:
    return ROW.findall((REPO / "docs" / "files.md").read_text())


def test_the_doc_table_is_the_code_table():
    rows = documented()
    table = {getattr(errno, name): status for name, status, _ in rows if name != "any other"}
    code_names = {
        number: grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == code)).name
        for number, code in ERRNO_STATUS.items()
    }
    assert table == code_names
    assert ("any other", "INTERNAL") in {(name, status) for name, status, _ in rows}


def test_each_status_raises_the_sdk_exception_the_doc_names():
    for _, status, exception in documented():
        assert error_class(status).__name__ == exception, (status, exception)


def test_os_error_uses_the_table_and_unknown_errnos_are_internal():
    assert os_error(FileNotFoundError(errno.ENOENT, "No such file or directory"), "/x").code == 5
    assert os_error(OSError(errno.ENOSPC, "No space left on device"), "/x").code == 8
    assert os_error(OSError(errno.EIO, "Input/output error"), "/x").code == INTERNAL
