"""The one table from a guest errno to the gRPC status a caller gets (docs/files.md prints it; a test keeps the two
equal). Every agent operation that fails with an OSError answers through `os_error`; the relay and gateway pass the
code on unchanged, and the SDK raises the exception of that code."""

from __future__ import annotations

import errno

# google.rpc.Code numbers.
CANCELLED, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED = 1, 3, 5, 6, 7
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, OUT_OF_RANGE, INTERNAL = 8, 9, 11, 13

ERRNO_STATUS: dict[int, int] = {
    errno.ENOENT: NOT_FOUND,
    errno.EEXIST: ALREADY_EXISTS,
    errno.EACCES: PERMISSION_DENIED,
    errno.EPERM: PERMISSION_DENIED,
    errno.ENOTDIR: FAILED_PRECONDITION,
    errno.EISDIR: FAILED_PRECONDITION,
    errno.ENOTEMPTY: FAILED_PRECONDITION,
    errno.EROFS: FAILED_PRECONDITION,
    errno.ELOOP: FAILED_PRECONDITION,
    errno.EBUSY: FAILED_PRECONDITION,
    errno.EXDEV: FAILED_PRECONDITION,
    errno.ETXTBSY: FAILED_PRECONDITION,
    errno.ENOSPC: RESOURCE_EXHAUSTED,
    errno.EDQUOT: RESOURCE_EXHAUSTED,
    errno.EMFILE: RESOURCE_EXHAUSTED,
    errno.ENFILE: RESOURCE_EXHAUSTED,
    errno.ENOMEM: RESOURCE_EXHAUSTED,
    errno.EAGAIN: RESOURCE_EXHAUSTED,
    errno.ENAMETOOLONG: INVALID_ARGUMENT,
    errno.EINVAL: INVALID_ARGUMENT,
    errno.EFBIG: OUT_OF_RANGE,
}
"""errno -> google.rpc.Code; any errno not listed is INTERNAL."""


class StreamError(Exception):
    """A stream failed with a google.rpc.Code; the agent sends it as an Error frame."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


def status_of(errno_number: int | None) -> int:
    return ERRNO_STATUS.get(errno_number or 0, INTERNAL)


def os_error(exc: OSError, path: str) -> StreamError:
    """The StreamError for `exc` met on `path` (named as the guest sees it): the table's code and the system's
    words."""
    from microvm_agent import files  # host simulation: guest paths live under files.PATH_ROOT

    if files.PATH_ROOT and path.startswith(files.PATH_ROOT):
        path = path[len(files.PATH_ROOT) :] or "/"
    return StreamError(status_of(exc.errno), f"{path}: {exc.strerror or exc}")
