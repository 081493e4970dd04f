"""The YAML recipe (`mvm.yaml`): the Dockerfile's steps plus what a Dockerfile cannot say.

    name: web                      # optional: the template's name
    description: Headless chromium
    from: default                  # required: template[:tag], or oci:PATH, oci-archive:PATH, docker-archive:PATH
    args: {VERSION: "1.2"}         # ARGs with defaults (null: no default); overridden by build args
    env: {LANG: C.UTF-8}           # ENV, first
    workdir: /app                  # WORKDIR, next
    apt: [git, curl]               # package lists, in this order: apt, pip, npm
    pip: [requests==2.32.3]
    npm: [typescript]
    steps:                         # then these, in order; each a one-key mapping
      - run: make install          #   shell form, or a list: exec form
      - copy: {src: [app/], dest: /app/, chown: "1000:1000"}
      - env: {DEBUG: "1"}
      - workdir: /srv
      - user: nobody
      - apt: [jq]                  #   pip and npm too
    user: agent                    # USER, last: packages and steps run as root unless a step says otherwise
    resources: {vcpus: 2, memory_mib: 2048, disk_mib: 4096}
    start: python3 -m http.server 8000   # run before the template snapshot (shell form, or a list)
    ready: {port: 8000, timeout_seconds: 60}   # or {command: "curl -sf localhost:8000"}
    pool_size: 2

Values get the Dockerfile's `$VAR` / `${VAR:-default}` substitution where Docker would substitute (from, copy,
env, workdir, user, package names, arg defaults), with no quote processing; `run`, `start` and `ready` are
left to the shell. Unknown keys, wrong types and out-of-bound values are INVALID_RECIPE naming the key path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from images.definition.errors import DEFINITION_TOO_LARGE, INVALID_RECIPE, DefinitionError, Where
from images.definition.instructions import CopyArgs, Instruction
from images.definition.plan import Command, ReadyCheck, Resources
from images.definition.words import expand

MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_PACKAGES = 500
MAX_STEPS = 500
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PACKAGE = {
    # Names and versions only: nothing that looks like an option, a URL or a path.
    "apt": re.compile(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?"),
    "pip": re.compile(
        r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._, -]+\])?"
        r"((===|==|!=|~=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+(\s*,\s*(===|==|!=|~=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+)*)?"
    ),
    "npm": re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(@[A-Za-z0-9.^~<>=*+_| -]+)?"),
}
BOUNDS = {
    "resources.vcpus": (1, 64),
    "resources.memory_mib": (128, 262144),
    "resources.disk_mib": (256, 1048576),
    "ready.port": (1, 65535),
    "ready.timeout_seconds": (1, 3600),
    "pool_size": (0, 64),
}
TOP_KEYS = (
    "name",
    "description",
    "from",
    "args",
    "env",
    "workdir",
    "apt",
    "pip",
    "npm",
    "steps",
    "user",
    "resources",
    "start",
    "ready",
    "pool_size",
)
STEP_KINDS = ("run", "copy", "env", "workdir", "user", "apt", "pip", "npm")


@dataclass(frozen=True)
class RecipeSettings:
    """What a recipe says beyond its steps."""

    name: str | None
    description: str | None
    resources: Resources
    start: Command | None
    ready: ReadyCheck | None
    pool_size: int | None


class _Document:
    """The recipe as plain values, with the line of every key path (for errors)."""

    def __init__(self, text: str) -> None:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
            raise DefinitionError(DEFINITION_TOO_LARGE, f"the recipe is larger than {MAX_RECIPE_BYTES} bytes")
        self.lines: dict[str, int] = {}
        self._seen: set[int] = set()
        self._scalars = yaml.constructor.SafeConstructor()
        try:
            self._check_depth(text)
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise DefinitionError(
                INVALID_RECIPE, f"not valid YAML: {problem}", line=mark.line + 1 if mark else None
            ) from None
        except RecursionError:
            raise DefinitionError(INVALID_RECIPE, "the recipe is nested too deeply") from None
        if node is None:
            raise DefinitionError(INVALID_RECIPE, "the recipe is empty: it needs at least `from`")
        self.root = self._plain(node, "", 0)

    @staticmethod
    def _check_depth(text: str) -> None:
        """Refuses deep nesting from the event stream (iterative), before composing (recursive) can choke."""
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise DefinitionError(
                        INVALID_RECIPE, "the recipe is nested too deeply", line=event.start_mark.line + 1
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1

    def where(self, key: str, instruction: str | None = None) -> Where:
        """Where `key` is, or (a key that is missing) its nearest enclosing key."""
        path = key
        while path and path not in self.lines:
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"[.\[]", path) else ""
        return Where(line=self.lines.get(path) if path else None, key=key or None, instruction=instruction)

    def error(self, key: str, message: str) -> DefinitionError:
        return self.where(key).error(INVALID_RECIPE, message)

    def _plain(self, node: yaml.Node, path: str, depth: int) -> object:
        if id(node) in self._seen:
            raise self.error(path, "YAML aliases (*name) are not supported")
        self._seen.add(id(node))
        self.lines.setdefault(path, node.start_mark.line + 1)
        if depth > MAX_DEPTH:
            raise self.error(path, "nested too deeply")
        if isinstance(node, yaml.MappingNode):
            result: dict[str, object] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                    raise self.error(path, f"keys must be strings, not {str(shown)[:40]!r}")
                key = key_node.value
                child = f"{path}.{key}" if path else key
                self.lines[child] = key_node.start_mark.line + 1
                if key in result:
                    raise self.error(child, "this key appears twice")
                result[key] = self._plain(value_node, child, depth + 1)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(node.value)]
        if node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"):
            try:
                return self._scalars.construct_object(node)
            except (ValueError, yaml.YAMLError):
                return node.value
        return node.value  # strings, and floats and timestamps as written (`1.10` stays "1.10")


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "a mapping", list: "a list", int: "a number", float: "a number"}.get(type(value), "a string")


class _Recipe:
    def __init__(self, document: _Document) -> None:
        self.doc = document

    def mapping(self, value: object, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.doc.error(key, f"must be a mapping, not {_describe(value)}")
        for name in value:
            if allowed is not None and name not in allowed:
                child = f"{key}.{name}" if key else name
                raise self.doc.error(child, f"unknown key {name!r} (known: {', '.join(allowed)})")
        return value

    def string(self, value: object, key: str, *, integers: bool = False, most: int = 65536) -> str:
        if integers and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or (value == "" and not integers):
            wanted = "a non-empty string" if not integers else "a string"
            raise self.doc.error(key, f"must be {wanted}, not {_describe(value)} (quote it)")
        if len(value) > most:
            raise self.doc.error(key, f"is longer than {most} characters")
        return value

    def strings(self, value: object, key: str, *, most: int = MAX_PACKAGES) -> list[str]:
        items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
        if items is None:
            raise self.doc.error(key, f"must be a string or a list of strings, not {_describe(value)}")
        if len(items) > most:
            raise self.doc.error(key, f"has more than {most} items")
        keys = [f"{key}[{index}]" for index in range(len(items))] if isinstance(value, list) else [key]
        return [self.string(item, item_key) for item, item_key in zip(items, keys, strict=True)]

    def integer(self, value: object, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.doc.error(key, f"must be a whole number, not {_describe(value)}")
        low, high = BOUNDS[key]
        if not low <= value <= high:
            raise self.doc.error(key, f"must be between {low} and {high}, got {value}")
        return value

    def command(self, value: object, key: str) -> Command:
        if isinstance(value, list):
            argv = self.strings(value, key, most=4096)
            if not argv:
                raise self.doc.error(key, "an exec-form command needs a program")
            return Command(argv=tuple(argv))
        return Command(shell=self.string(value, key))

    # -- instructions

    def variables(self, value: object, key: str, *, nullable: bool) -> list[tuple[str, str | None, str]]:
        out = []
        for name, item in self.mapping(value, key).items():
            child = f"{key}.{name}"
            if not VARIABLE.fullmatch(name):
                raise self.doc.error(child, f"{name!r} is not a variable name")
            if item is None and nullable:
                out.append((name, None, child))
            else:
                out.append((name, self.string(item, child, integers=True), child))
        return out

    def env(self, value: object, key: str) -> Instruction:
        pairs = self.variables(value, key, nullable=False)
        if not pairs:
            raise self.doc.error(key, "sets nothing")
        where = self.doc.where(key, "ENV")

        def cook(variables: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
            return tuple((name, expand(text or "", variables, where)) for name, text, _ in pairs)

        return Instruction("ENV", where, cook)

    def args(self, value: object, key: str) -> Instruction:
        declared = self.variables(value, key, nullable=True)
        where = self.doc.where(key, "ARG")

        def cook(variables: Mapping[str, str]) -> tuple[tuple[str, str | None], ...]:
            return tuple((name, None if text is None else expand(text, variables, where)) for name, text, _ in declared)

        return Instruction("ARG", where, cook)

    def word(self, keyword: str, value: object, key: str) -> Instruction:
        text = self.string(value, key, integers=keyword == "USER")
        where = self.doc.where(key, keyword)

        def cook(variables: Mapping[str, str]) -> str:
            result = expand(text, variables, where)
            if not result:
                raise where.error(INVALID_RECIPE, "is empty once variables are substituted")
            return result

        return Instruction(keyword, where, cook)

    def packages(self, manager: str, value: object, key: str) -> Instruction:
        names = self.strings(value, key)
        if not names:
            raise self.doc.error(key, "lists no packages")
        where = self.doc.where(key, manager.upper())

        def cook(variables: Mapping[str, str]) -> tuple[str, ...]:
            out = []
            for index, name in enumerate(names):
                package = expand(name, variables, where)
                if not PACKAGE[manager].fullmatch(package):
                    raise where.error(
                        INVALID_RECIPE, f"{package!r} is not a {manager} package name[version]", key=f"{key}[{index}]"
                    )
                out.append(package)
            return tuple(out)

        return Instruction(manager.upper(), where, cook)

    def copy(self, value: object, key: str) -> Instruction:
        spec = self.mapping(value, key, ("src", "dest", "chown"))
        for required in ("src", "dest"):
            if required not in spec:
                raise self.doc.error(f"{key}.{required}", "is required")
        sources = self.strings(spec["src"], f"{key}.src", most=4096)
        if not sources:
            raise self.doc.error(f"{key}.src", "lists no sources")
        dest = self.string(spec["dest"], f"{key}.dest")
        chown = self.string(spec["chown"], f"{key}.chown", integers=True) if "chown" in spec else None
        where = self.doc.where(key, "COPY")

        def cook(variables: Mapping[str, str]) -> CopyArgs:
            return CopyArgs(
                tuple(expand(source, variables, where) for source in sources),
                expand(dest, variables, where),
                None if chown is None else expand(chown, variables, where),
            )

        return Instruction("COPY", where, cook)

    def run(self, value: object, key: str) -> Instruction:
        command = self.command(value, key)
        return Instruction("RUN", self.doc.where(key, "RUN"), lambda _variables: command)

    def step(self, value: object, key: str) -> Instruction:
        if not isinstance(value, dict) or len(value) != 1:
            raise self.doc.error(key, f"a step is a mapping with one key, one of: {', '.join(STEP_KINDS)}")
        ((kind, body),) = value.items()
        child = f"{key}.{kind}"
        if kind not in STEP_KINDS:
            raise self.doc.error(child, f"unknown step {kind!r} (known: {', '.join(STEP_KINDS)})")
        if kind in ("apt", "pip", "npm"):
            return self.packages(kind, body, child)
        if kind in ("workdir", "user"):
            return self.word(kind.upper(), body, child)
        return {"run": self.run, "copy": self.copy, "env": self.env}[kind](body, child)

    def instructions(self) -> list[Instruction]:
        top = self.mapping(self.doc.root, "", TOP_KEYS)
        if "from" not in top:
            raise self.doc.error("from", "is required: a template name[:tag] or an image archive")
        out = [self.word("FROM", top["from"], "from")]
        if "args" in top:
            # Declared before FROM, so `from` may use them, and again after it (inheriting the values), so every
            # step sees them: a Dockerfile's `ARG X=1` / `FROM ...` / `ARG X`.
            declared = self.args(top["args"], "args")
            names = tuple((name, None) for name in self.mapping(top["args"], "args"))
            out = [declared, *out, Instruction("ARG", declared.where, lambda _variables: names)]
        if "env" in top:
            out.append(self.env(top["env"], "env"))
        if "workdir" in top:
            out.append(self.word("WORKDIR", top["workdir"], "workdir"))
        for manager in ("apt", "pip", "npm"):
            if manager in top:
                out.append(self.packages(manager, top[manager], manager))
        steps = top.get("steps", [])
        if not isinstance(steps, list):
            raise self.doc.error("steps", f"must be a list, not {_describe(steps)}")
        if len(steps) > MAX_STEPS:
            raise DefinitionError(DEFINITION_TOO_LARGE, f"more than {MAX_STEPS} steps", key="steps")
        out.extend(self.step(step, f"steps[{index}]") for index, step in enumerate(steps))
        if "user" in top:
            out.append(self.word("USER", top["user"], "user"))
        return out

    def settings(self) -> RecipeSettings:
        top = self.doc.root
        assert isinstance(top, dict)
        name = None
        if "name" in top:
            name = self.string(top["name"], "name")
            if not TEMPLATE_NAME.fullmatch(name):
                raise self.doc.error("name", f"{name!r} is not a template name ([a-z0-9][a-z0-9-]{{0,62}})")
        description = self.string(top["description"], "description", most=1024) if "description" in top else None
        resources = Resources()
        if "resources" in top:
            spec = self.mapping(top["resources"], "resources", ("vcpus", "memory_mib", "disk_mib"))
            resources = Resources(**{field: self.integer(value, f"resources.{field}") for field, value in spec.items()})
        start = self.command(top["start"], "start") if "start" in top else None
        ready = None
        if "ready" in top:
            spec = self.mapping(top["ready"], "ready", ("command", "port", "timeout_seconds"))
            if ("command" in spec) == ("port" in spec):
                raise self.doc.error("ready", "needs exactly one of `command` and `port`")
            ready = ReadyCheck(
                command=self.command(spec["command"], "ready.command") if "command" in spec else None,
                port=self.integer(spec["port"], "ready.port") if "port" in spec else None,
                timeout_seconds=self.integer(spec.get("timeout_seconds", 60), "ready.timeout_seconds"),
            )
        pool_size = self.integer(top["pool_size"], "pool_size") if "pool_size" in top else None
        return RecipeSettings(name, description, resources, start, ready, pool_size)


def parse_recipe(text: str) -> tuple[list[Instruction], RecipeSettings]:
    """The recipe's instructions (in the order they run) and its settings; DefinitionError naming the key."""
    recipe = _Recipe(_Document(text))
    instructions = recipe.instructions()
    return instructions, recipe.settings()
