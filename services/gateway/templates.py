"""TemplateCatalog: the templates sandboxes can be created from, as the cluster's nodes report them.

A node's compute records in its node record which template images it has built, their disk sizes, and which
template snapshots it holds (a warm create restores one of those). A template is listed when some node has it;
a node that is away still counts (its sandboxes come back with it)."""

from __future__ import annotations

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import template_pb2
from microvm.types.v1 import node_pb2
from services.common.errors import InvalidArgument
from services.common.records import NODES, Records, Stored
from services.common.validation import check_page_size


class TemplateCatalog:
    def __init__(self, etcd) -> None:
        self.records = Records(etcd)

    async def image_builds(self) -> dict[str, str]:
        """Image -> its current build on the nodes (the newest name any node reports)."""
        builds: dict[str, str] = {}
        for stored in await self.records.list(NODES):
            for name, build in stored.message.template_builds.items():
                builds[name] = max(builds.get(name, ""), build)
        return builds

    async def all(self) -> list[template_pb2.Template]:
        """The built-in templates (images the installation built); user templates' build images are not listed."""
        return self.builtin_on(await self.records.list(NODES))

    @classmethod
    def builtin_on(cls, nodes: list[Stored[node_pb2.NodeRecord]]) -> list[template_pb2.Template]:
        """`all()` as `nodes` (their records, as read) report it."""
        return [t for t in cls.images_on(nodes) if not t.name.startswith("templates/u-")]

    async def images(self) -> list[template_pb2.Template]:
        """Every image some node has, built-in or a user template's build (`u-<build>`)."""
        return self.images_on(await self.records.list(NODES))

    @staticmethod
    def images_on(nodes: list[Stored[node_pb2.NodeRecord]]) -> list[template_pb2.Template]:
        templates: dict[str, template_pb2.Template] = {}
        for stored in nodes:
            node, record = stored.parts[0], stored.message
            for name in record.templates:
                template = templates.setdefault(name, template_pb2.Template(name=f"templates/{name}", builtin=True))
                template.nodes.append(node)
                template.disk_bytes = max(template.disk_bytes, record.template_disk_bytes.get(name, 0))
            for snapshot in record.template_snapshots:
                template = templates.get(snapshot.template)
                if template is None:
                    continue
                template.warm = True
                size = f"{snapshot.vcpus}c{snapshot.memory_mib}m"
                if size not in template.warm_sizes:
                    template.warm_sizes.append(size)
        for template in templates.values():
            template.nodes.sort()
            template.warm_sizes.sort()
        return [templates[name] for name in sorted(templates)]

    async def list(self, request: api.ListTemplatesRequest) -> api.ListTemplatesResponse:
        page_size = check_page_size(request.page_size)
        try:
            offset = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("page_token is not one this server issued", reason="INVALID_PAGE_TOKEN") from None
        if offset < 0:
            raise InvalidArgument("page_token is not one this server issued", reason="INVALID_PAGE_TOKEN")
        templates = await self.all()
        page = templates[offset : offset + page_size]
        token = str(offset + page_size) if offset + page_size < len(templates) else ""
        return api.ListTemplatesResponse(templates=page, next_page_token=token)
