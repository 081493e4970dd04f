"""`Template`: what to build into a template (docs/templates.md), for `client.templates.build(template, "name")`.

From a file or text:

    Template.from_dockerfile("Dockerfile")              # its directory is the build context
    Template.from_recipe("images/web/mvm.yaml")         # a YAML recipe; the name comes from its `name:`
    Template(dockerfile="FROM default\\nRUN echo hi", context={"app.py": "print(1)"})   # text, files inline

Or written in code, E2B/Modal style; each method returns a new Template (a shared prefix can be reused):

    web = (
        Template("web")
        .from_template("python")                         # template[:tag], or an image archive reference
        .apt_install(["curl"])
        .pip_install(["flask==3.0.3"])
        .copy("app/", "/app/")                           # from the context: Template(context=...), default .
        .workdir("/app")
        .start_cmd("python3 -m flask run --port 8000", ready_port=8000)
        .resources(vcpus=2, memory_mib=1024)
    )
    print(web.to_recipe())                              # the mvm.yaml it stands for

The steps run in the order the methods were called (each is a recipe step). Nothing here talks to the server or
checks more than the shape of what is given: the server parses the definition, and its objections are
InvalidArgumentError with the reason and the line or key (`reason`, `metadata`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from microvm_sandbox.errors import InvalidArgumentError

Context = Path | Mapping[str, bytes | str]
Command = str | Sequence[str]
Source = Literal["dockerfile", "recipe"]
RECIPE_SUFFIXES = (".yaml", ".yml")
# A recipe's top-level `name:` (the server's parser is the judge; this only reads what a file names itself).
_RECIPE_NAME = re.compile(r"""^name:[ \t]*(["']?)([a-z0-9][a-z0-9-]{0,62})\1[ \t]*(#.*)?$""", re.M)
# Characters a YAML 1.1 reader does not take as they are inside a quoted scalar (line breaks, non-printables).
_YAML_ESCAPE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar of `text` (JSON's string syntax, which YAML reads the same way)."""
    return _YAML_ESCAPE.sub(lambda match: f"\\u{ord(match.group()):04x}", json.dumps(text, ensure_ascii=False))


def _flow(value: object) -> str:
    """`value` (str, int, None, lists, mappings) in YAML flow style, every string quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        raise InvalidArgumentError("a recipe takes no booleans: give the value as a string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_quoted(str(key))}: {_flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    raise InvalidArgumentError(f"a recipe cannot hold a {type(value).__name__}")


def _command(command: Command) -> str | list[str]:
    """A shell command line (str) or an argv (exec form)."""
    if isinstance(command, str):
        if not command:
            raise InvalidArgumentError("a command cannot be empty")
        return command
    argv = [str(word) for word in command]
    if not argv:
        raise InvalidArgumentError("an exec-form command needs a program")
    return argv


def _names(values: str | Sequence[str], what: str) -> list[str]:
    names = [values] if isinstance(values, str) else list(values)
    if not names:
        raise InvalidArgumentError(f"{what} lists nothing")
    return names


def _names_a_path(text: str) -> bool:
    if "\n" in text or "\0" in text:
        return False
    try:
        return Path(text).exists()
    except OSError:  # e.g. a name too long: text
        return False


def _read(value: str | Path, default_name: str) -> tuple[str, Path | None]:
    """The text of `value` and the file it came from: a Path, or a str naming an existing file or directory, is
    read (a directory's `default_name`); any other str with a blank or a line break is the text itself; a single
    word naming nothing is a missing file."""
    if isinstance(value, str) and not _names_a_path(value):
        if value.split() == [value]:
            raise FileNotFoundError(2, "No such file or directory", value)
        return value, None
    path = Path(value)
    if path.is_dir():
        path = path / default_name
    return path.read_text(encoding="utf-8"), path


class Template:
    """A template definition: a Dockerfile, a YAML recipe, or a recipe written with the methods below, plus its
    build context (the directory or inline files COPY reads). Immutable: every method returns a new Template.

    name: the template's name (`web`, or `web:tag` to move that tag too), used when a build is given none.
    description: what it is for (recipes). context: a directory, or {path: bytes or str} files sent inline.
    dockerfile / recipe: the definition as text (at most one; neither: a recipe written in code)."""

    def __init__(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        context: str | Context | None = None,
        dockerfile: str | None = None,
        recipe: str | None = None,
    ) -> None:
        if dockerfile is not None and recipe is not None:
            raise InvalidArgumentError("a template is a Dockerfile or a recipe, not both")
        self._name = name
        self._description = description
        self._context: Context | None = Path(context) if isinstance(context, str) else context
        self._text = dockerfile if dockerfile is not None else recipe
        self._source: Source = "dockerfile" if dockerfile is not None else "recipe"
        if name is None and recipe is not None:
            found = _RECIPE_NAME.search(recipe)
            self._name = found.group(2) if found else None
        self._base: str | None = None
        self._args: tuple[tuple[str, str | None], ...] = ()
        self._steps: tuple[tuple[str, object], ...] = ()
        self._start: str | list[str] | None = None
        self._ready: dict[str, object] | None = None
        self._resources: dict[str, int] = {}
        self._pool_size: int | None = None

    # --- from files or text -----------------------------------------------------------------------------
    @classmethod
    def from_dockerfile(
        cls, dockerfile: str | Path, *, context: str | Context | None = None, name: str | None = None
    ) -> Template:
        """A Dockerfile (the subset of docs/templates.md): a path (a directory: its `Dockerfile`; the file's
        directory is the default context) or its text (no context unless given)."""
        text, path = _read(dockerfile, "Dockerfile")
        return cls(name, context=context if context is not None else path and path.parent, dockerfile=text)

    @classmethod
    def from_recipe(
        cls, recipe: str | Path, *, context: str | Context | None = None, name: str | None = None
    ) -> Template:
        """A YAML recipe: a path (a directory: its `mvm.yaml`; the file's directory is the default context) or
        its text. The name defaults to the recipe's own top-level `name:`."""
        text, path = _read(recipe, "mvm.yaml")
        return cls(name, context=context if context is not None else path and path.parent, recipe=text)

    @classmethod
    def from_file(cls, path: str | Path, *, context: str | Context | None = None, name: str | None = None) -> Template:
        """A recipe when the file ends in .yaml or .yml, else a Dockerfile (as images.definition.load_plan)."""
        reader = cls.from_recipe if Path(path).suffix in RECIPE_SUFFIXES else cls.from_dockerfile
        return reader(Path(path), context=context, name=name)

    # --- what it is ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The template's name (`web` or `web:tag`) when known: given, or a recipe's own `name:`."""
        return self._name

    @property
    def source(self) -> Source:
        """`dockerfile` or `recipe` (a recipe written in code is a recipe)."""
        return self._source

    @property
    def context(self) -> Context | None:
        """The build context: a directory, inline files, or None. A recipe written in code whose steps copy
        something has the current directory unless one was given."""
        if self._context is None and self._text is None and any(kind == "copy" for kind, _ in self._steps):
            return Path.cwd()
        return self._context

    @property
    def definition(self) -> str:
        """The text sent to the builder: the Dockerfile, the recipe, or the recipe rendered from the methods."""
        return self._text if self._text is not None else self.to_recipe()

    def with_context(self, context: str | Context | None) -> Template:
        """The same definition with another build context (None: none)."""
        return self._with(_context=Path(context) if isinstance(context, str) else context)

    # --- a recipe written in code -------------------------------------------------------------------------
    def _with(self, **changes: object) -> Template:
        copy = object.__new__(Template)
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    def _step(self, kind: str, value: object) -> Template:
        self._in_code(kind)
        return self._with(_steps=(*self._steps, (kind, value)))

    def _in_code(self, method: str) -> None:
        if self._text is not None:
            kind = "Dockerfile" if self._source == "dockerfile" else "recipe"
            raise InvalidArgumentError(f"{method}(): this template is a {kind} given as text, not written in code")

    def from_template(self, base: str) -> Template:
        """The base: `template[:tag]` (tag default latest), or `oci:PATH`, `oci-archive:PATH`,
        `docker-archive:PATH` (a path inside the context)."""
        self._in_code("from_template")
        return self._with(_base=base)

    def args(self, values: Mapping[str, str | None]) -> Template:
        """ARGs with their defaults (None: no default), overridden by the build's build_args; `$NAME` in later
        values."""
        self._in_code("args")
        return self._with(_args=(*self._args, *values.items()))

    def env(self, values: Mapping[str, str]) -> Template:
        """Sets environment variables (ENV) for the next steps and the template's sandboxes."""
        return self._step("env", dict(values))

    def workdir(self, path: str) -> Template:
        """The working directory (created) of the next steps and of the sandboxes' processes."""
        return self._step("workdir", path)

    def user(self, user: str) -> Template:
        """The user (`name`, `uid` or `user:group`) of the next steps and, if last, of the sandboxes' processes."""
        return self._step("user", user)

    def run(self, command: Command) -> Template:
        """Runs a command: a string through /bin/sh -c, a list as argv."""
        return self._step("run", _command(command))

    def copy(self, src: str | Sequence[str], dest: str, *, chown: str | None = None) -> Template:
        """Copies files of the context (paths relative to it) to `dest` in the image (Docker's COPY rules: a
        directory's contents; several sources need a `dest/`)."""
        spec: dict[str, object] = {"src": _names(src, "copy()"), "dest": dest}
        if chown is not None:
            spec["chown"] = chown
        return self._step("copy", spec)

    def apt_install(self, packages: str | Sequence[str]) -> Template:
        """Installs Debian packages (`name[:arch][=version]`)."""
        return self._step("apt", _names(packages, "apt_install()"))

    def pip_install(self, packages: str | Sequence[str]) -> Template:
        """Installs Python packages (`name[extras][specifiers]`, e.g. `requests>=2.31,<3`)."""
        return self._step("pip", _names(packages, "pip_install()"))

    def npm_install(self, packages: str | Sequence[str]) -> Template:
        """Installs npm packages globally (`@scope/name@range`)."""
        return self._step("npm", _names(packages, "npm_install()"))

    def start_cmd(
        self,
        command: Command,
        *,
        ready_port: int | None = None,
        ready_cmd: Command | None = None,
        ready_timeout: int | None = None,
    ) -> Template:
        """A command started before the template is snapshotted (sandboxes start with it running), and how to
        tell it is ready: a TCP port that accepts, or a command that exits 0 (at most one), within ready_timeout
        seconds (server default 60)."""
        self._in_code("start_cmd")
        if ready_port is not None and ready_cmd is not None:
            raise InvalidArgumentError("start_cmd(): give ready_port or ready_cmd, not both")
        ready: dict[str, object] | None = None
        if ready_port is not None or ready_cmd is not None:
            ready = {"port": ready_port} if ready_port is not None else {"command": _command(ready_cmd or "")}
            if ready_timeout is not None:
                ready["timeout_seconds"] = ready_timeout
        elif ready_timeout is not None:
            raise InvalidArgumentError("start_cmd(): ready_timeout needs ready_port or ready_cmd")
        return self._with(_start=_command(command), _ready=ready)

    def resources(
        self, *, vcpus: int | None = None, memory_mib: int | None = None, disk_mib: int | None = None
    ) -> Template:
        """A sandbox's default size: virtual CPUs, memory and disk in MiB (the ones given; the rest unchanged)."""
        self._in_code("resources")
        given = {"vcpus": vcpus, "memory_mib": memory_mib, "disk_mib": disk_mib}
        return self._with(_resources={**self._resources, **{k: v for k, v in given.items() if v is not None}})

    def pool_size(self, size: int) -> Template:
        """Warm sandboxes kept booted for this template on each node (0 allowed)."""
        self._in_code("pool_size")
        return self._with(_pool_size=size)

    def to_recipe(self) -> str:
        """The YAML recipe (mvm.yaml) this template is: the text it was given, or the one its methods wrote."""
        if self._text is not None:
            if self._source == "dockerfile":
                raise InvalidArgumentError("this template is a Dockerfile, not a recipe")
            return self._text
        if self._base is None:
            raise InvalidArgumentError("a template needs a base: call from_template() first")
        lines = ["# written by microvm_sandbox.Template"]
        if self._name is not None:
            lines.append(f"name: {_quoted(self._name.partition(':')[0])}")
        if self._description is not None:
            lines.append(f"description: {_quoted(self._description)}")
        lines.append(f"from: {_quoted(self._base)}")
        if self._args:
            lines.append(f"args: {_flow(dict(self._args))}")
        if self._steps:
            lines.append("steps:")
            lines += [f"  - {kind}: {_flow(value)}" for kind, value in self._steps]
        if self._resources:
            lines.append(f"resources: {_flow(self._resources)}")
        if self._start is not None:
            lines.append(f"start: {_flow(self._start)}")
        if self._ready is not None:
            lines.append(f"ready: {_flow(self._ready)}")
        if self._pool_size is not None:
            lines.append(f"pool_size: {_flow(self._pool_size)}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        where = f" context={self._context}" if isinstance(self._context, Path) else ""
        return f"<Template {self._name or '(unnamed)'} {self._source}{where}>"
