"""Checks of public requests, applied where they enter (the gateway; the relay again, as the service that runs
them): every bound written in the protos' comments is enforced here, so nothing malformed reaches a guest and no
Python error text ever comes back as INTERNAL. One function per kind of field; each raises InvalidArgument naming
the field."""

from __future__ import annotations

import posixpath

from services.common.errors import InvalidArgument

MAX_ARGS = 4096
MAX_ARG_BYTES = 128 << 10
MAX_ENV = 1024
MAX_ENV_BYTES = 128 << 10
MAX_PATH_BYTES = 4096
MAX_USER = 64
MAX_TERMINAL = 9999
# Offsets and lengths of file reads: 2^50 bytes (1 PiB) is beyond any guest disk.
MAX_FILE_OFFSET = 1 << 50
MAX_MODE = 0o7777
MAX_PAGE_SIZE = 1000


def _text(value: str, field: str, most: int) -> None:
    if "\x00" in value:
        raise InvalidArgument(f"{field} contains a NUL byte", reason="INVALID_REQUEST")
    if len(value.encode()) > most:
        raise InvalidArgument(f"{field} is longer than {most} bytes", reason="INVALID_REQUEST")


def check_path(path: str, field: str = "path") -> str:
    """An absolute guest path without NUL bytes, at most 4096 bytes; returned normalized."""
    _text(path, field, MAX_PATH_BYTES)
    if not path.startswith("/"):
        raise InvalidArgument(f"{field} must be absolute, got {path!r}", reason="INVALID_PATH")
    return posixpath.normpath("/" + path.lstrip("/"))


def check_removable(path: str) -> None:
    if check_path(path) == "/":
        raise InvalidArgument(f"refusing to remove the guest's root ({path!r})", reason="INVALID_PATH")


def check_rename(source: str, destination: str) -> None:
    """Rename: two absolute paths, neither the root."""
    for path, field in ((source, "source"), (destination, "destination")):
        if check_path(path, field) == "/":
            raise InvalidArgument(f"{field} must not be the guest's root", reason="INVALID_PATH")


def check_terminal(cols: int, rows: int) -> None:
    if not (0 <= cols <= MAX_TERMINAL and 0 <= rows <= MAX_TERMINAL):
        raise InvalidArgument(
            f"terminal size must be 0..{MAX_TERMINAL} columns and rows, got {cols}x{rows}", reason="INVALID_REQUEST"
        )


def check_process(process) -> None:
    """A ProcessConfig: a program, at most 4096 arguments of at most 128 KiB, environment names that are names,
    no NUL byte anywhere, a timeout that is not negative, a terminal of sane size."""
    if not process.argv:
        raise InvalidArgument("process.argv must name a program", reason="INVALID_REQUEST")
    if len(process.argv) > MAX_ARGS:
        raise InvalidArgument(f"process.argv has more than {MAX_ARGS} entries", reason="INVALID_REQUEST")
    for index, argument in enumerate(process.argv):
        _text(argument, f"process.argv[{index}]", MAX_ARG_BYTES)
    check_env(process.env, "process.env")
    if process.cwd:
        check_path(process.cwd, "process.cwd")
    _text(process.user, "process.user", MAX_USER)
    if process.timeout.seconds < 0 or process.timeout.nanos < 0:
        raise InvalidArgument("process.timeout must not be negative", reason="INVALID_REQUEST")
    check_terminal(process.terminal_size.cols, process.terminal_size.rows)


def check_env(env, what: str) -> None:
    """Environment variables: at most MAX_ENV, names non-empty without '=', no NUL byte, each part bounded."""
    if len(env) > MAX_ENV:
        raise InvalidArgument(f"{what} has more than {MAX_ENV} entries", reason="INVALID_REQUEST")
    for name, value in env.items():
        if not name or "=" in name:
            raise InvalidArgument(f"{what} name {name!r} must be non-empty and without '='", reason="INVALID_REQUEST")
        _text(name, f"{what} name", MAX_ENV_BYTES)
        _text(value, f"{what}[{name!r}]", MAX_ENV_BYTES)


MAX_PID = 1 << 22
MAX_TAIL_BYTES = 1 << 20
MAX_PROCESS_INPUT = 1 << 20
MAX_TAG_BYTES = 256


def check_process_ref(pid: int, tail_bytes: int = 0) -> None:
    """A background process named by pid (1..2^22, the kernel's limit), and how much of its output to replay."""
    if not 1 <= pid <= MAX_PID:
        raise InvalidArgument(f"pid must be between 1 and {MAX_PID}", reason="INVALID_REQUEST")
    if not 0 <= tail_bytes <= MAX_TAIL_BYTES:
        raise InvalidArgument(f"tail_bytes must be between 0 and {MAX_TAIL_BYTES}", reason="INVALID_REQUEST")


def check_process_input(data: bytes) -> None:
    if len(data) > MAX_PROCESS_INPUT:
        raise InvalidArgument(f"stdin is limited to {MAX_PROCESS_INPUT} bytes per call", reason="INVALID_REQUEST")


def check_signal(number: int) -> None:
    if not 1 <= number <= 64:
        raise InvalidArgument("signal must be between 1 and 64", reason="INVALID_REQUEST")


def check_tag(tag: str) -> None:
    _text(tag, "tag", MAX_TAG_BYTES)


def check_range(offset: int, length: int) -> None:
    if not (0 <= offset <= MAX_FILE_OFFSET and 0 <= length <= MAX_FILE_OFFSET):
        raise InvalidArgument(f"offset and length must be between 0 and {MAX_FILE_OFFSET}", reason="INVALID_RANGE")


def check_console_read(tail_bytes: int, offset: int, length: int) -> None:
    """ReadConsoleLog: either the newest `tail_bytes`, or `offset` and `length`, each 0..2^50."""
    if not 0 <= tail_bytes <= MAX_FILE_OFFSET:
        raise InvalidArgument(f"tail_bytes must be between 0 and {MAX_FILE_OFFSET}", reason="INVALID_RANGE")
    check_range(offset, length)
    if tail_bytes and (offset or length):
        raise InvalidArgument("tail_bytes excludes offset and length: ask for one or the other", reason="INVALID_RANGE")


def check_mode(mode: int) -> None:
    if not 0 <= mode <= MAX_MODE:
        raise InvalidArgument(f"mode must be a permission mask 0..0o7777, got {oct(mode)}", reason="INVALID_REQUEST")


def check_page_size(page_size: int) -> int:
    """The page size to use: 0 means the default (50), at most 1000."""
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_REQUEST")
    return min(page_size or 50, MAX_PAGE_SIZE)
