"""Template build definitions: a Dockerfile subset or a YAML recipe (`mvm.yaml`) to one typed `BuildPlan`.

    plan = plan_dockerfile(text, context="path/to/context", build_args={"VERSION": "2"})
    plan = plan_recipe(text, context="path/to/context")
    for step in plan.steps: step.key, step.text, ...

Pure: reads the context (only what COPY and an archive base name), never the network, never runs anything.
Every problem with the input is a `DefinitionError` with a stable `reason` and the `line` or `key` involved.
The reference is docs/templates.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from images.definition.context import ContextLimits
from images.definition.dockerfile import parse_dockerfile
from images.definition.errors import REASONS, DefinitionError
from images.definition.plan import (
    Base,
    BuildPlan,
    Command,
    CopyEntry,
    CopyStep,
    EnvStep,
    PackagesStep,
    ReadyCheck,
    ResolvedBase,
    Resources,
    RunStep,
    Step,
    UserStep,
    WorkdirStep,
)
from images.definition.planner import Planner
from images.definition.recipe import parse_recipe

__all__ = [
    "REASONS",
    "Base",
    "BuildPlan",
    "Command",
    "ContextLimits",
    "CopyEntry",
    "CopyStep",
    "DefinitionError",
    "EnvStep",
    "PackagesStep",
    "ReadyCheck",
    "ResolvedBase",
    "Resources",
    "RunStep",
    "Step",
    "UserStep",
    "WorkdirStep",
    "load_plan",
    "plan_dockerfile",
    "plan_recipe",
]


def plan_dockerfile(
    text: str,
    context: Path | str | None = None,
    build_args: Mapping[str, str] | None = None,
    limits: ContextLimits | None = None,
    resolve_base: Callable[[Base], ResolvedBase] | None = None,
) -> BuildPlan:
    """The plan of a Dockerfile; `context` is the directory COPY reads from (None: no COPY possible).
    `resolve_base`, a builder's, tells what a base is now (ResolvedBase: its build and environment); without
    it a template base is keyed by name:tag alone and has Docker's default PATH as its environment."""
    return Planner("dockerfile", context, build_args, limits, resolve_base).plan(parse_dockerfile(text), None)


def plan_recipe(
    text: str,
    context: Path | str | None = None,
    build_args: Mapping[str, str] | None = None,
    limits: ContextLimits | None = None,
    resolve_base: Callable[[Base], ResolvedBase] | None = None,
) -> BuildPlan:
    """The plan of a YAML recipe (mvm.yaml); `build_args` override its `args`."""
    instructions, settings = parse_recipe(text)
    return Planner("recipe", context, build_args, limits, resolve_base).plan(instructions, settings)


def load_plan(
    path: Path | str,
    context: Path | str | None = None,
    build_args: Mapping[str, str] | None = None,
    limits: ContextLimits | None = None,
    resolve_base: Callable[[Base], ResolvedBase] | None = None,
) -> BuildPlan:
    """The plan of a file: a recipe when it ends in .yaml or .yml, else a Dockerfile. The context defaults to
    the file's directory."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    context = path.parent if context is None else context
    planner = plan_recipe if path.suffix in (".yaml", ".yml") else plan_dockerfile
    return planner(text, context, build_args, limits, resolve_base)
