"""BuiltInRecipes: the heavy built-in templates (images/templates/<name>/mvm.yaml: `python`, `web`) are built on
first use, so `make up` stays fast. A create naming one that is not built yet starts its build (a public template,
built by the installation) and is answered FAILED_PRECONDITION (reason TEMPLATE_BUILDING, the build's name in the
metadata): the caller follows the build and creates again. A recipe whose base is another recipe not built yet
starts that one first. A recipe whose last build failed in the last `RETRY_AFTER_SECONDS` reports that failure
instead of building again at every create. `make templates` builds them all ahead of time.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import structlog
import yaml

from microvm.sandbox.v1 import template_service_pb2 as api
from microvm.types.v1 import template_pb2
from services.common.errors import FailedPrecondition, ServiceError
from services.common.records import TEMPLATES
from services.gateway.build_intake import intake
from services.gateway.template_builds import TemplateBuilds
from services.gateway.template_store import PUBLIC, RUNNING_BUILDS, TemplateStore, build_name

log = structlog.get_logger()
RECIPES = Path(__file__).resolve().parents[2] / "images" / "templates"
RETRY_AFTER_SECONDS = 600


class BuiltInRecipes:
    def __init__(self, store: TemplateStore, builds: TemplateBuilds, work_root: Path, root: Path = RECIPES) -> None:
        self.store, self.builds, self.work_root, self.root = store, builds, work_root, root

    def recipe(self, name: str) -> Path | None:
        path = self.root / name / "mvm.yaml"
        return path if path.is_file() else None

    async def built(self, name: str) -> bool:
        stored = await self.store.records.get(TEMPLATES, PUBLIC, name)
        return stored is not None and "latest" in stored.message.tags

    async def on_missing(self, name: str, tag: str) -> ServiceError | None:
        """What a create of `name:tag` hears when no such template exists; None when it is no built-in recipe
        (or the installation runs the fake VMM, whose "guests" are host processes: no recipe runs there)."""
        recipe = self.recipe(name)
        if recipe is None or tag != "latest":
            return None
        views = (await self.builds.nodes.views([])).values()
        if not any(view.alive and view.record.vmm != "fake" for view in views):
            return None
        base = str(yaml.safe_load(recipe.read_text()).get("from", "")).split(":")[0]
        if self.recipe(base) is not None and not await self.built(base):
            answer = await self.on_missing(base, "latest")
            if answer is not None and answer.reason == "TEMPLATE_BUILD_FAILED":
                return answer
            return building(name, answer, f"its base {base!r} is being built first; create again when both are")
        stored = await self.store.records.get(TEMPLATES, PUBLIC, name)
        if stored is not None:
            builds = await self.store.builds_of(stored.message)
            running = [b for b in builds if b.state in RUNNING_BUILDS]
            if running:
                return building(name, build_name(running[0]), "its build is running")
            failed = [b for b in builds if b.state == template_pb2.TEMPLATE_BUILD_STATE_FAILED]
            if failed and time.time() - failed[0].end_time.ToSeconds() < RETRY_AFTER_SECONDS:
                return FailedPrecondition(
                    f"the built-in template {name!r} failed to build ({build_name(failed[0])}: "
                    f"{failed[0].failure_reason}: {failed[0].failure_message.splitlines()[0][:300]}); it is tried "
                    f"again {RETRY_AFTER_SECONDS // 60} minutes after",
                    reason="TEMPLATE_BUILD_FAILED",
                    metadata={"template": name, "build": build_name(failed[0])},
                )
        return await self.start(name, recipe)

    async def start(self, name: str, recipe: Path) -> ServiceError:
        work = self.work_root / f"ctx-{uuid.uuid4().hex[:12]}"
        context = work / "context"
        shutil.copytree(recipe.parent, context)
        spec = api.BuildTemplateSpec(template=f"templates/{name}", recipe=recipe.read_text())
        try:
            request = await intake(spec, context, self.store, self.builds.trust, self.builds.import_archive)
            build, _ = await self.builds.start(request, "installation", system=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.info("builtin_template_build_started", template=name, build=build.id)
        return building(name, build_name(build), "its build started now, on first use")


def building(name: str, build: ServiceError | str | None, why: str) -> ServiceError:
    if isinstance(build, ServiceError):  # the base's answer: name its build
        build = (build.metadata or {}).get("build")
    metadata = {"template": name} | ({"build": build} if build else {})
    follow = f" ({build}: mvm template logs {build.split('/')[1]} --follow)" if build else ""
    return FailedPrecondition(
        f"the built-in template {name!r} is not built yet: {why}{follow}; create again when it has succeeded",
        reason="TEMPLATE_BUILDING",
        metadata=metadata,
    )
