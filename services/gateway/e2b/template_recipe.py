"""An E2B template build (`TemplateBuildStartV2`: a base, steps, start and ready commands) as our YAML recipe
(images/definition/recipe.py), which the gateway's BuildTemplate builds like any other.

- Base: `fromTemplate` is one of our templates (E2B names as aliases); `fromImage` E2B's base image (`e2bdev/base`)
  is our `default`. Any other image, and a private registry, is refused by name: our builds start from templates or
  image archives, not from a registry.
- Steps: RUN (as its user when it names one, then back), COPY (src relative to the context the SDK uploads, dest,
  chown), ENV, WORKDIR, USER map one to one. A COPY with a mode has no recipe form: refused by name.
- `startCmd` is the recipe's `start`, `readyCmd` its `ready` command; `cpuCount` and `memoryMB` its resources.
"""

from __future__ import annotations

import yaml

from services.gateway.e2b import shapes
from services.gateway.e2b.shapes import E2bError

BASE_IMAGES = {"e2bdev/base": "default", "e2bdev/base:latest": "default"}


def base_of(start: dict) -> str:
    if start.get("fromImageRegistry"):
        raise E2bError(501, "building from a private registry is not supported by this backend")
    if start.get("fromTemplate"):
        return shapes.our_template(str(start["fromTemplate"]))
    image = start.get("fromImage") or "e2bdev/base"
    if image not in BASE_IMAGES:
        raise E2bError(
            501,
            f"building from the image {image!r} is not supported by this backend: start from a template "
            "(from_template) or E2B's base image (from_base_image)",
        )
    return BASE_IMAGES[image]


def _args(step: dict, least: int) -> list[str]:
    args = step.get("args") or []
    if not isinstance(args, list) or len(args) < least or not all(isinstance(a, str) for a in args):
        raise E2bError(400, f"a {step.get('type')} step needs {least} or more string args, not {args!r}")
    return args


def steps_of(start: dict) -> list[dict]:
    steps: list[dict] = []
    user = ""  # the USER so far ("": the base's)
    for step in start.get("steps") or []:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "RUN":
            command, *rest = _args(step, 1)
            run_as = rest[0] if rest and rest[0] else ""
            if run_as and run_as != user:
                steps += [{"user": run_as}, {"run": command}, {"user": user or "root"}]
            else:
                steps.append({"run": command})
        elif kind == "COPY":
            src, dest, *rest = _args(step, 2)
            owner, mode = (rest + ["", ""])[:2]
            if mode:
                raise E2bError(501, "COPY with a mode is not supported by this backend (set it with a RUN chmod)")
            steps.append({"copy": {"src": [src], "dest": dest, **({"chown": owner} if owner else {})}})
        elif kind == "ENV":
            args = _args(step, 2)
            if len(args) % 2:
                raise E2bError(400, "an ENV step needs name, value pairs")
            steps.append({"env": dict(zip(args[::2], args[1::2], strict=True))})
        elif kind == "WORKDIR":
            steps.append({"workdir": _args(step, 1)[0]})
        elif kind == "USER":
            user = _args(step, 1)[0]
            steps.append({"user": user})
        else:
            raise E2bError(400, f"unknown template step type {kind!r}")
    return steps


def recipe(start: dict, resources: dict[str, int]) -> str:
    """The recipe text of an E2B build start, with `resources` (vcpus, memory_mib) from its template request."""
    found: dict = {"from": base_of(start), "steps": steps_of(start)}
    if resources:
        found["resources"] = resources
    if start.get("startCmd"):
        found["start"] = str(start["startCmd"])
    if start.get("readyCmd"):
        found["ready"] = {"command": str(start["readyCmd"])}
    if not found["steps"]:
        del found["steps"]
    return yaml.safe_dump(found, sort_keys=False)
