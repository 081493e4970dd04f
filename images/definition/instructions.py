"""What both front ends produce: instructions in order, each knowing where it came from and how to turn its
text into values once the variables in scope are known (Docker substitutes at that point, per instruction)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from images.definition.errors import Where

# FROM, ARG, RUN, COPY, ENV, WORKDIR, USER from both; APT, PIP, NPM from recipes only.
KEYWORDS = ("FROM", "ARG", "RUN", "COPY", "ENV", "WORKDIR", "USER", "APT", "PIP", "NPM")


@dataclass(frozen=True)
class CopyArgs:
    sources: tuple[str, ...]
    dest: str
    chown: str | None


@dataclass(frozen=True)
class Instruction:
    """`cook(variables)` returns the instruction's values with variables substituted: FROM and WORKDIR and
    USER a str, ARG a tuple of (name, default or None), RUN a Command, COPY a CopyArgs, ENV a tuple of
    (name, value), APT/PIP/NPM a tuple of package names."""

    keyword: str
    where: Where
    cook: Callable[[Mapping[str, str]], object]
