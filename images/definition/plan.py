"""The build plan: what a template build does, typed and frozen, the same whether it came from a Dockerfile
or a recipe. A builder walks `steps` in order; each step's `key` names the layer it produces (see cache.py)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from images.definition.errors import Where

Pairs = tuple[tuple[str, str], ...]


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Command:
    """A command: shell form (run by `/bin/sh -c`) or exec form (an argv, no shell). Exactly one is set."""

    shell: str | None = None
    argv: tuple[str, ...] | None = None

    @property
    def text(self) -> str:
        return self.shell if self.shell is not None else _json(list(self.argv or ()))

    def canonical(self) -> object:
        return {"shell": self.shell} if self.shell is not None else {"argv": list(self.argv or ())}

    def as_argv(self) -> tuple[str, ...]:
        """What to execute: the argv, or the shell form as `/bin/sh -c TEXT`."""
        return ("/bin/sh", "-c", self.shell) if self.shell is not None else tuple(self.argv or ())


@dataclass(frozen=True)
class Base:
    """What the build starts from: a template (`kind` "template", `name`, `tag`) or an image archive in the
    build context (`kind` "oci" for an OCI layout directory, "oci-archive", "docker-archive"; `path` relative to
    the context, `digest` the sha256 of its content as walked)."""

    kind: str
    name: str | None = None
    tag: str | None = None
    path: str | None = None
    digest: str | None = None

    @property
    def text(self) -> str:
        return f"{self.name}:{self.tag}" if self.kind == "template" else f"{self.kind}:{self.path}"

    def canonical(self) -> object:
        return {"kind": self.kind, "name": self.name, "tag": self.tag, "path": self.path, "digest": self.digest}


@dataclass(frozen=True)
class ResolvedBase:
    """What a builder knows about a base that the definition cannot: `digest`, the build a template[:tag]
    names right now (it becomes part of every key, so moving a tag rebuilds what is built on it; None for an
    archive, whose content is hashed already), and `env`, the base's environment, which substitution sees
    under the definition's own ENV (`ENV PATH=/opt/bin:$PATH`); `workdir` and `user`, the base's own, which the
    definition starts from (a relative COPY destination or WORKDIR is taken from the base's working directory)."""

    digest: str | None
    env: Pairs
    workdir: str = "/"
    user: str | None = None


# The environment assumed under a base when no resolver says otherwise: Docker's default PATH.
DEFAULT_BASE_ENV: Pairs = (("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),)


@dataclass(frozen=True)
class CopyEntry:
    """One thing a COPY puts into the image: `kind` "file", "dir" or "symlink"; `source` relative to the
    context (POSIX), `dest` absolute in the image; `mode` the permission bits; `size` in bytes (files);
    `digest` the sha256 of the file's bytes (files) and `target` the link's text (symlinks)."""

    source: str
    dest: str
    kind: str
    mode: int
    size: int = 0
    digest: str | None = None
    target: str | None = None

    def canonical(self) -> object:
        return [self.dest, self.kind, self.mode, self.size, self.digest, self.target]


@dataclass(frozen=True)
class Step:
    """A step of the plan. `parent` is the key of the step before it (the base's key for the first step);
    `key` = sha256(parent, canonical text, copied content): the name of the layer this step produces."""

    where: Where = field(compare=False)
    parent: str
    key: str

    kind = "STEP"

    def fields(self) -> object:
        raise NotImplementedError

    def canonical(self) -> str:
        """The step's stable text form for hashing: JSON of its kind and resolved fields."""
        return _json({"kind": self.kind, "fields": self.fields()})

    @property
    def text(self) -> str:
        """The step as a person reads it in a build log."""
        raise NotImplementedError


@dataclass(frozen=True)
class RunStep(Step):
    """Runs a command. `build_args` are the ARG values in scope: the command sees them as environment
    variables (as Docker does), so they are part of the key; they are not kept in the image."""

    command: Command = Command(shell="")
    build_args: Pairs = ()
    kind = "RUN"

    def fields(self) -> object:
        return {"command": self.command.canonical(), "build_args": [list(pair) for pair in self.build_args]}

    @property
    def text(self) -> str:
        return f"RUN {self.command.text}"


PACKAGE_COMMANDS = {
    # What each package list runs, shell form, as root. Part of the key: changing it rebuilds.
    "apt": (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {packages}"
        " && apt-get clean && rm -rf /var/lib/apt/lists/*"
    ),
    "pip": "python3 -m pip install --no-cache-dir --break-system-packages {packages}",
    "npm": "npm install --global --no-fund --no-audit {packages}",
}


@dataclass(frozen=True)
class PackagesStep(Step):
    """Installs a package list with apt, pip or npm (recipe only); `command` is exactly what runs."""

    manager: str = "apt"
    packages: tuple[str, ...] = ()
    build_args: Pairs = ()
    kind = "PACKAGES"

    @property
    def command(self) -> Command:
        quoted = " ".join(shlex.quote(package) for package in self.packages)
        return Command(shell=PACKAGE_COMMANDS[self.manager].format(packages=quoted))

    def fields(self) -> object:
        return {
            "manager": self.manager,
            "packages": list(self.packages),
            "command": self.command.canonical(),
            "build_args": [list(pair) for pair in self.build_args],
        }

    @property
    def text(self) -> str:
        return f"{self.manager.upper()} {' '.join(self.packages)}"


@dataclass(frozen=True)
class CopyStep(Step):
    """Copies files from the build context. `sources` as written (substituted), `dest` absolute (a relative
    destination is taken from the WORKDIR), `entries` every file, directory and symlink it puts in the image,
    in order; `chown` is `user[:group]` as written (resolved in the image by the builder), None for 0:0."""

    sources: tuple[str, ...] = ()
    dest: str = "/"
    chown: str | None = None
    entries: tuple[CopyEntry, ...] = ()
    kind = "COPY"

    def fields(self) -> object:
        return {"sources": list(self.sources), "dest": self.dest, "chown": self.chown}

    @property
    def text(self) -> str:
        chown = f"--chown={self.chown} " if self.chown is not None else ""
        return f"COPY {chown}{' '.join(self.sources)} {self.dest}"


@dataclass(frozen=True)
class EnvStep(Step):
    """Sets environment variables in the image (and for the steps after it)."""

    values: Pairs = ()
    kind = "ENV"

    def fields(self) -> object:
        return [list(pair) for pair in self.values]

    @property
    def text(self) -> str:
        return "ENV " + " ".join(f"{name}={shlex.quote(value)}" for name, value in self.values)


@dataclass(frozen=True)
class WorkdirStep(Step):
    """Sets (and creates) the working directory: an absolute, normalised path."""

    path: str = "/"
    kind = "WORKDIR"

    def fields(self) -> object:
        return self.path

    @property
    def text(self) -> str:
        return f"WORKDIR {self.path}"


@dataclass(frozen=True)
class UserStep(Step):
    """Sets the user (`name`, `uid`, `user:group`) the steps after it and the sandbox's processes run as."""

    user: str = "root"
    kind = "USER"

    def fields(self) -> object:
        return self.user

    @property
    def text(self) -> str:
        return f"USER {self.user}"


@dataclass(frozen=True)
class Resources:
    """What a sandbox of the template gets by default; None: the installation's default."""

    vcpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None


@dataclass(frozen=True)
class ReadyCheck:
    """When a started template is ready for its snapshot: `command` exits 0, or TCP `port` accepts, polled
    until `timeout_seconds`."""

    command: Command | None = None
    port: int | None = None
    timeout_seconds: int = 60


@dataclass(frozen=True)
class BuildPlan:
    """A whole template build. `env` (what this definition sets, on top of `base_env`), `workdir` and `user`
    are as they stand after the last step: what a sandbox's processes get. `key` names the finished template
    (the last layer plus start, ready and resources): two plans with the same key build the same template."""

    source: str  # "dockerfile" or "recipe"
    base: Base
    base_key: str
    base_env: Pairs
    steps: tuple[Step, ...]
    env: Pairs
    workdir: str
    user: str | None
    resources: Resources
    start: Command | None
    ready: ReadyCheck | None
    pool_size: int | None
    name: str | None
    description: str | None
    build_args: Pairs  # the declared ARGs' values as used (overrides applied)
    proxy_args: Pairs  # HTTP_PROXY and friends: passed to RUN, never part of a key (as Docker)
    key: str

    @property
    def copied_files(self) -> tuple[CopyEntry, ...]:
        """Every regular file the build reads from the context, once each, in first-use order."""
        seen: dict[str, CopyEntry] = {}
        for step in self.steps:
            if isinstance(step, CopyStep):
                for entry in step.entries:
                    if entry.kind == "file":
                        seen.setdefault(entry.source, entry)
        return tuple(seen.values())
