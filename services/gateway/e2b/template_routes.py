"""What the E2B control plane answers about templates: whether a name exists (`Template.exists`, `GET
/templates/aliases/{alias}`), from our TemplateService, E2B's well-known names being aliases of our built-ins. The
Template builder itself (`POST /v3/templates`, builds, file uploads) is not served: 501 by name (control_plane.py).
"""

from __future__ import annotations

from aiohttp import web

from microvm.sandbox.v1 import template_service_pb2, template_service_pb2_grpc
from services.gateway.e2b import shapes


async def alias(plane, request: web.Request) -> web.Response:
    metadata = plane.metadata(request)
    name = shapes.our_template(request.match_info["alias"])
    stub = template_service_pb2_grpc.TemplateServiceStub(plane.loopback.channel)
    await stub.GetTemplate(
        template_service_pb2.GetTemplateRequest(name=f"templates/{name}"), metadata=metadata, timeout=30
    )
    return web.json_response({"templateID": name, "public": False})
