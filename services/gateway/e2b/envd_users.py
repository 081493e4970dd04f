"""Who an envd call acts as, and where its relative paths point.

The E2B SDK names a user with `Authorization: Basic base64("<user>:")` on process calls and with `?username=` on
`/files`; left out, E2B's envd uses the sandbox's default user, `user` (home `/home/user`). Our guests have no
such account: a command that names no user runs as the template's default user (root in `default`, home `/root`)
in the template's working directory. So E2B's `user`, and no user at all, become "no user" in our API (the
template's default); any other name (`root`, or an account a template created) is passed through and the guest
refuses a name it does not know. A relative path is relative to that user's home, as in envd: `/root` for the
default and root, `/home/<name>` for another name.
"""

from __future__ import annotations

import base64
import binascii
import posixpath

from services.gateway.e2b.connect_protocol import ConnectError

E2B_DEFAULT_USER = "user"
DEFAULT_HOME = "/root"


def our_user(name: str | None) -> str:
    """The `user` of our ProcessConfig for an E2B user name ("" is the template's default)."""
    return "" if not name or name == E2B_DEFAULT_USER else name


def user_from_basic_auth(header: str | None) -> str:
    """Our user for the `Authorization: Basic ...` header the SDK sends with Start."""
    if not header:
        return ""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        name = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        raise ConnectError("invalid_argument", "the Authorization header is not Basic base64(user:)") from None
    return our_user(name)


def home(user: str) -> str:
    return DEFAULT_HOME if user in ("", "root") else f"/home/{user}"


def absolute(path: str, user: str, what: str = "path") -> str:
    """`path` made absolute against the user's home (`~` included); empty is the home itself."""
    if "\0" in path:
        raise ConnectError("invalid_argument", f"{what} contains a NUL byte")
    if path == "~" or path.startswith("~/"):
        path = path[2:]
    if not path.startswith("/"):
        path = posixpath.join(home(user), path) if path else home(user)
    return posixpath.normpath(path) if path != "/" else path
