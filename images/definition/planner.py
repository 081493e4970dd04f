"""Instructions to a build plan: ARG scope and build args, substitution, WORKDIR, COPY resolution against the
context, and each step's cache key.

A step's key is sha256 over KEY_VERSION, the parent's key, the step's canonical text (JSON of its kind and
resolved fields, including the ARG values in scope for RUN and package steps) and, for COPY, a digest of every
entry it copies (destination, kind, mode, size, content sha256 or link target). The base's key covers its
reference and, for an archive, its content. Files nothing copies are never read, so they change no key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from images.definition.context import BuildContext, ContextLimits
from images.definition.errors import (
    COPY_SOURCE_NOT_FOUND,
    DEFINITION_TOO_LARGE,
    INVALID_BASE,
    INVALID_DOCKERFILE,
    INVALID_RECIPE,
    UNKNOWN_BUILD_ARG,
    UNSUPPORTED_INSTRUCTION,
    DefinitionError,
    Where,
)
from images.definition.instructions import CopyArgs, Instruction
from images.definition.plan import (
    DEFAULT_BASE_ENV,
    Base,
    BuildPlan,
    Command,
    CopyEntry,
    CopyStep,
    EnvStep,
    PackagesStep,
    ResolvedBase,
    Resources,
    RunStep,
    Step,
    UserStep,
    WorkdirStep,
)
from images.definition.recipe import RecipeSettings

KEY_VERSION = "microvm-template-step-v1"
MAX_STEPS = 500
TEMPLATE_REFERENCE = re.compile(r"([a-z0-9][a-z0-9-]{0,62})(?::([A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?")
ARCHIVE_KINDS = ("oci-archive", "docker-archive", "oci")
# Docker's predefined ARGs: usable without an ARG line, passed to RUN, never part of a cache key.
PROXY_ARGS = frozenset(
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
)
USER_TEXT = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*(:[A-Za-z0-9_.][A-Za-z0-9_.-]*)?")


def step_key(parent: str, canonical: str, content: str = "") -> str:
    digest = hashlib.sha256()
    for part in (KEY_VERSION, parent, canonical, content):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def entries_digest(entries: Sequence[CopyEntry]) -> str:
    text = json.dumps([entry.canonical() for entry in entries], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Planner:
    def __init__(
        self,
        source: str,
        context: Path | str | None,
        build_args: Mapping[str, str] | None,
        limits: ContextLimits | None,
        resolve_base: Callable[[Base], ResolvedBase] | None = None,
    ) -> None:
        self.source = source
        self.resolve_base = resolve_base
        self.base_env: dict[str, str] = {}
        self.invalid = INVALID_DOCKERFILE if source == "dockerfile" else INVALID_RECIPE
        self.context = BuildContext(context, limits) if context is not None else None
        self.overrides = dict(build_args or {})
        self.declared: set[str] = set()
        self.args: dict[str, str | None] = {}
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.user: str | None = None
        self.steps: list[Step] = []

    # -- helpers

    def variables(self) -> dict[str, str]:
        scope = {name: value for name, value in self.args.items() if value is not None}
        scope.update(self.base_env)  # the base's ENV, like the definition's own, wins over an ARG
        scope.update(self.env)
        return scope

    def declare(self, cooked: object, inherited: Mapping[str, str | None]) -> None:
        for name, default in cooked:  # type: ignore[attr-defined]
            self.declared.add(name)
            if name in self.overrides:
                self.args[name] = self.overrides[name]
            elif default is None and name in inherited:
                self.args[name] = inherited[name]
            else:
                self.args[name] = default

    def args_in_scope(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((name, value) for name, value in self.args.items() if value is not None))

    def context_for(self, where: Where, what: str) -> BuildContext:
        if self.context is None:
            raise where.error(COPY_SOURCE_NOT_FOUND, f"{what} needs a build context, and none was given")
        return self.context

    def parent(self, base_key: str) -> str:
        return self.steps[-1].key if self.steps else base_key

    # -- the base

    def base(self, reference: str, where: Where) -> tuple[Base, str]:
        kind, colon, path = reference.partition(":")
        if colon and kind in ARCHIVE_KINDS:
            if not path:
                raise where.error(INVALID_BASE, f"{kind}: needs a path in the build context")
            context = self.context_for(where, f"a {kind} base")
            relative = context.normalise(path, where)
            matches = context.resolve(relative, where, wildcards=False)
            match = matches[0]
            if match.is_dir != (kind == "oci"):
                wanted = "an OCI layout directory" if kind == "oci" else "an archive file"
                raise where.error(INVALID_BASE, f"{kind}:{path} is not {wanted}")
            entries = context.entries(match, "/", where)
            base = Base(kind, path=relative, digest=entries_digest(entries) if kind == "oci" else entries[0].digest)
        else:
            match = TEMPLATE_REFERENCE.fullmatch(reference)
            if not match:
                raise where.error(
                    INVALID_BASE,
                    f"{reference[:200]!r} is not a template name[:tag], oci:PATH, oci-archive:PATH or"
                    " docker-archive:PATH (images from a registry: `docker save` them and use docker-archive:PATH)",
                )
            base = Base("template", name=match.group(1), tag=match.group(2) or "latest")
        resolved = self.resolve_base(base) if self.resolve_base else ResolvedBase(None, DEFAULT_BASE_ENV)
        if base.kind == "template" and resolved.digest is not None:
            base = dataclasses.replace(base, digest=resolved.digest)
        self.base_env = dict(resolved.env)
        self.workdir = resolved.workdir or "/"
        self.user = resolved.user or None
        return base, step_key("", json.dumps(["base", base.canonical()], sort_keys=True))

    # -- steps

    def copy(self, args: CopyArgs, where: Where, parent: str) -> CopyStep:
        context = self.context_for(where, "COPY")
        dest = args.dest if args.dest.startswith("/") else posixpath.join(self.workdir, args.dest)
        into_directory = dest.endswith("/") or dest.endswith("/.") or dest in ("/", ".")
        target = posixpath.normpath(dest)
        target = "/" + target.lstrip("/")
        matches = [match for source in args.sources for match in context.resolve(source, where)]
        if (len(args.sources) > 1 or len(matches) > 1) and not into_directory:
            raise where.error(
                self.invalid, f"COPY with several sources needs a directory destination ending in '/', not {dest!r}"
            )
        if args.chown is not None and not USER_TEXT.fullmatch(args.chown):
            raise where.error(self.invalid, f"--chown={args.chown!r} is not user[:group]")
        entries: list[CopyEntry] = []
        for match in matches:
            if match.is_dir:
                put = target
            elif into_directory:
                put = posixpath.join(target, posixpath.basename(match.relative))
            else:
                put = target
            entries.extend(context.entries(match, put, where))
        shown_dest = target + ("/" if into_directory and target != "/" else "")
        step = CopyStep(where, parent, "", sources=args.sources, dest=shown_dest, chown=args.chown)
        key = step_key(parent, step.canonical(), entries_digest(entries))
        return dataclasses.replace(step, key=key, entries=tuple(entries))

    def step(self, instruction: Instruction, parent: str) -> Step:
        where, keyword = instruction.where, instruction.keyword
        cooked = instruction.cook(self.variables())
        if keyword == "RUN":
            assert isinstance(cooked, Command)
            made: Step = RunStep(where, parent, "", command=cooked, build_args=self.args_in_scope())
        elif keyword in ("APT", "PIP", "NPM"):
            made = PackagesStep(
                where, parent, "", manager=keyword.lower(), packages=cooked, build_args=self.args_in_scope()
            )
        elif keyword == "COPY":
            assert isinstance(cooked, CopyArgs)
            return self.copy(cooked, where, parent)
        elif keyword == "ENV":
            self.env.update(cooked)  # type: ignore[arg-type]
            made = EnvStep(where, parent, "", values=cooked)
        elif keyword == "WORKDIR":
            self.workdir = posixpath.normpath(posixpath.join(self.workdir, str(cooked)))
            self.workdir = "/" + self.workdir.lstrip("/")
            made = WorkdirStep(where, parent, "", path=self.workdir)
        elif keyword == "USER":
            if not USER_TEXT.fullmatch(str(cooked)):
                raise where.error(self.invalid, f"USER {cooked!r} is not user[:group] (a name or a number)")
            self.user = str(cooked)
            made = UserStep(where, parent, "", user=self.user)
        else:
            raise where.error(UNSUPPORTED_INSTRUCTION, f"{keyword} may appear only once, first")
        return dataclasses.replace(made, key=step_key(parent, made.canonical()))

    def plan(self, instructions: Sequence[Instruction], settings: RecipeSettings | None) -> BuildPlan:
        index = 0
        while index < len(instructions) and instructions[index].keyword == "ARG":
            self.declare(instructions[index].cook(self.variables()), {})
            index += 1
        if index == len(instructions) or instructions[index].keyword != "FROM":
            where = instructions[index].where if index < len(instructions) else Where()
            found = f"{instructions[index].keyword} before FROM" if index < len(instructions) else "no FROM"
            raise where.error(self.invalid, f"{found}: a Dockerfile starts with FROM (only ARG may come before it)")
        global_args = dict(self.args)
        from_instruction = instructions[index]
        base, base_key = self.base(str(from_instruction.cook(self.variables())), from_instruction.where)
        self.args = {}  # ARGs before FROM are in scope for FROM only, unless declared again after it
        for instruction in instructions[index + 1 :]:
            if instruction.keyword == "FROM":
                raise instruction.where.error(
                    UNSUPPORTED_INSTRUCTION, "a second FROM: multi-stage builds are not supported"
                )
            if instruction.keyword == "ARG":
                self.declare(instruction.cook(self.variables()), global_args)
                continue
            self.steps.append(self.step(instruction, self.parent(base_key)))
            if len(self.steps) > MAX_STEPS:
                raise instruction.where.error(DEFINITION_TOO_LARGE, f"more than {MAX_STEPS} steps")
        unknown = sorted(set(self.overrides) - self.declared - PROXY_ARGS)
        if unknown:
            raise DefinitionError(
                UNKNOWN_BUILD_ARG, f"build arg {unknown[0]!r} is not declared by any ARG", key=unknown[0]
            )
        settings = settings or RecipeSettings(None, None, Resources(), None, None, None)
        last = self.parent(base_key)
        final = {
            "start": settings.start and settings.start.canonical(),
            "ready": settings.ready
            and {
                "command": settings.ready.command and settings.ready.command.canonical(),
                "port": settings.ready.port,
                "timeout_seconds": settings.ready.timeout_seconds,
            },
            "resources": settings.resources.__dict__,
            "env": sorted(self.env.items()),
            "workdir": self.workdir,
            "user": self.user,
        }
        used = {**global_args, **self.args}
        return BuildPlan(
            source=self.source,
            base=base,
            base_key=base_key,
            base_env=tuple(self.base_env.items()),
            steps=tuple(self.steps),
            env=tuple(self.env.items()),
            workdir=self.workdir,
            user=self.user,
            resources=settings.resources,
            start=settings.start,
            ready=settings.ready,
            pool_size=settings.pool_size,
            name=settings.name,
            description=settings.description,
            build_args=tuple(sorted((k, v) for k, v in used.items() if v is not None)),
            proxy_args=tuple(sorted((k, v) for k, v in self.overrides.items() if k in PROXY_ARGS - self.declared)),
            key=step_key(last, json.dumps(final, sort_keys=True)),
        )
