"""The shape of sandbox requests: resource names, labels and list filters, checked before anything is done
(INVALID_ARGUMENT naming what is wrong)."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

SANDBOX_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def parse_name(name: str, collection: str = "sandboxes") -> str:
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not SANDBOX_ID.fullmatch(name[len(prefix) :]):
        raise InvalidArgument(
            f"{name!r} is not a valid resource name; expected {collection}/{{id}}", reason="INVALID_NAME"
        )
    return name[len(prefix) :]


def validate_labels(labels, what: str = "label", most: int = 64) -> None:
    if len(labels) > most:
        raise InvalidArgument(f"at most {most} {what}s are allowed")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"{what} key {key!r} must match {LABEL_KEY.pattern}")
        if len(value) > 63:
            raise InvalidArgument(f"{what} {key!r}: value longer than 63 characters")


def parse_filter(text: str) -> dict[str, str]:
    wanted = {}
    for term in text.split():
        match = re.fullmatch(r"labels\.([a-z][a-z0-9_-]*)=(.*)", term)
        if not match:
            raise InvalidArgument(f"filter term {term!r} is not of the form labels.KEY=VALUE")
        wanted[match.group(1)] = match.group(2).strip('"')
    return wanted
