"""Webhooks (services/gateway/webhooks.py, webhook_delivery.py, webhook_dispatch.py) on a whole installation (fake
VMM) whose gateway may reach 127.0.0.0/8 and retries quickly, delivering to a real aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest

from microvm.sandbox.v1 import sandbox_pb2, webhook_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import webhook_service_pb2 as hooks
from microvm.types.v1 import event_pb2, webhook_pb2
from services.common.errors import error_info
from services.common.records import VMS, WEBHOOK_LOCKS, Records
from services.gateway.records import sandbox_key
from tests.etcd import free_port
from tests.inprocess import Caller, InProcessNode, etcd_client_for, fake_image_root, start_installation, tenant_caller
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(240)
CREATED, DELETED = event_pb2.SANDBOX_EVENT_TYPE_CREATED, event_pb2.SANDBOX_EVENT_TYPE_DELETED
FAILED_EVENT = event_pb2.SANDBOX_EVENT_TYPE_FAILED
SUCCEEDED = webhook_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED
PENDING = webhook_pb2.WEBHOOK_DELIVERY_STATE_PENDING
FAILED = webhook_pb2.WEBHOOK_DELIVERY_STATE_FAILED
GATEWAY = {
    "webhook_allowed_networks": ["127.0.0.0/8"],
    "webhook_retry_seconds": 0.2,
    "webhook_timeout_seconds": 1.0,
    "webhook_max_attempts": 3,
}


@pytest.fixture(scope="module")
async def installation(etcd_server):
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-webhooks-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
    node.settings["gateway"] = dict(GATEWAY)
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture
async def receiver():
    receiver = await Receiver().start()
    yield receiver
    await receiver.stop()


class Tenant:
    def __init__(self, caller: Caller, name: str) -> None:
        self.caller, self.name, self.md = caller, name, caller.metadata
        self.hooks = webhook_service_pb2_grpc.WebhookServiceStub(caller.channel)
        self.label = {"hook": uuid.uuid4().hex[:8]}

    async def webhook(self, url: str, *types: int, **fields) -> hooks.CreateWebhookResponse:
        wanted = hooks.Webhook(url=url, event_types=types, labels=fields.pop("labels", self.label), **fields)
        return await self.hooks.CreateWebhook(hooks.CreateWebhookRequest(webhook=wanted), metadata=self.md, timeout=30)

    async def deliveries(self, name: str) -> list[hooks.WebhookDelivery]:
        request = hooks.ListWebhookDeliveriesRequest(webhook=name)
        return list((await self.hooks.ListWebhookDeliveries(request, metadata=self.md, timeout=30)).deliveries)

    async def until_deliveries(self, name: str, done, timeout: float = 60) -> list[hooks.WebhookDelivery]:
        for _ in range(int(timeout / 0.1)):
            found = await self.deliveries(name)
            if done(found):
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"deliveries of {name}: {found}")

    async def create(self, **fields) -> sandbox_pb2.Sandbox:
        request = api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(**{"labels": self.label, **fields}))
        return (await self.caller.stub.CreateSandbox(request, metadata=self.md, timeout=60)).sandbox

    async def delete(self, name: str) -> None:
        await self.caller.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), metadata=self.md, timeout=60)


@pytest.fixture
async def tenant(installation):
    name = f"wh-{uuid.uuid4().hex[:8]}"
    tenant = Tenant(await tenant_caller(installation, name), name)
    yield tenant
    await tenant.caller.channel.close()


async def test_a_webhook_is_created_listed_and_deleted_and_its_secret_shown_once(installation, tenant):
    made = await tenant.webhook("https://hooks.example.com/mvm", CREATED, description="ci")
    assert made.secret.startswith("whsec_") and made.webhook.name.startswith("webhooks/wh-")
    listed = (await tenant.hooks.ListWebhooks(hooks.ListWebhooksRequest(), metadata=tenant.md, timeout=30)).webhooks
    assert [w.name for w in listed] == [made.webhook.name]
    assert made.secret not in str(listed) and list(listed[0].event_types) == [CREATED]
    got = (await tenant.hooks.GetWebhook(hooks.GetWebhookRequest(name=made.webhook.name), metadata=tenant.md)).webhook
    assert got.url == "https://hooks.example.com/mvm" and got.description == "ci"
    # Another tenant's webhook is exactly as absent as one that never was.
    other = Tenant(await tenant_caller(installation, f"wh-other-{uuid.uuid4().hex[:6]}"), "other")
    answers = []
    for name in (made.webhook.name, "webhooks/wh-000000000000"):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await other.hooks.GetWebhook(hooks.GetWebhookRequest(name=name), metadata=other.md)
        answers.append(
            (missing.value.code(), error_info(missing.value).reason, missing.value.details().replace(name[9:], "ID"))
        )
    assert answers[0] == answers[1] == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND", "webhook ID does not exist")
    assert not (await other.hooks.ListWebhooks(hooks.ListWebhooksRequest(), metadata=other.md)).webhooks
    await tenant.hooks.DeleteWebhook(hooks.DeleteWebhookRequest(name=made.webhook.name), metadata=tenant.md)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await tenant.deliveries(made.webhook.name)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    await other.caller.channel.close()


async def test_events_are_posted_signed_in_order_and_logged(tenant, receiver):
    made = await tenant.webhook(f"{receiver.url}/ok", CREATED, DELETED)
    elsewhere = await tenant.create(labels={"hook": "someone-else"})  # not the webhook's label: not delivered
    sandbox = await tenant.create()
    await tenant.delete(sandbox.name)
    posts = await receiver.wait_for("ok", 2)
    assert all(post.signed_with(made.secret) for post in posts)
    assert [(p.event["type"], p.event["sandbox"]) for p in posts] == [
        ("SANDBOX_EVENT_TYPE_CREATED", sandbox.name),
        ("SANDBOX_EVENT_TYPE_DELETED", sandbox.name),
    ]
    first = posts[0]
    assert first.headers["X-Mvm-Event"] == "SANDBOX_EVENT_TYPE_CREATED"
    assert first.headers["X-Mvm-Webhook"] == made.webhook.name
    assert first.delivery == f"{made.webhook.name.split('/')[1]}-{first.event['cursor']}"
    assert first.headers["Content-Type"] == "application/json"
    logged = await tenant.until_deliveries(made.webhook.name, lambda d: len(d) == 2 and d[0].state == SUCCEEDED)
    assert [d.id for d in logged] == [p.delivery for p in reversed(posts)]  # newest first
    assert all((d.state, d.attempts, d.last_status_code) == (SUCCEEDED, 1, 200) for d in logged)
    assert logged[0].event.sandbox == sandbox.name and logged[0].event.type == DELETED
    got = await tenant.hooks.GetWebhook(hooks.GetWebhookRequest(name=made.webhook.name), metadata=tenant.md)
    assert got.webhook.cursor == posts[-1].event["cursor"]
    await tenant.delete(elsewhere.name)
    assert len(receiver.on("ok")) == 2


async def test_an_endpoint_that_fails_twice_gets_the_event_on_the_third_attempt(tenant, receiver):
    made = await tenant.webhook(f"{receiver.url}/flaky", CREATED)
    sandbox = await tenant.create()
    posts = await receiver.wait_for("flaky", 3)
    assert len({post.delivery for post in posts}) == 1 and all(post.signed_with(made.secret) for post in posts)
    (logged,) = await tenant.until_deliveries(made.webhook.name, lambda d: d and d[0].state == SUCCEEDED)
    assert (logged.attempts, logged.last_status_code, logged.last_error) == (3, 200, "")
    assert logged.event.sandbox == sandbox.name
    await tenant.delete(sandbox.name)


async def test_a_dead_or_hanging_endpoint_never_holds_up_the_api(tenant, receiver):
    closed = await tenant.webhook(f"http://127.0.0.1:{free_port()}/nobody", CREATED)
    hanging = await tenant.webhook(f"{receiver.url}/hang", CREATED)
    first = await tenant.create()
    # The create has answered; its event's deliveries are still being tried.
    await receiver.wait_for("hang", 1)
    (pending,) = await tenant.until_deliveries(hanging.webhook.name, lambda d: bool(d))
    assert pending.state == PENDING and pending.event.sandbox == first.name
    second = await tenant.create()  # while the first event's delivery to the hanging endpoint is still pending
    assert second.state == sandbox_pb2.SANDBOX_STATE_RUNNING
    for made in (closed, hanging):
        done = await tenant.until_deliveries(made.webhook.name, lambda d: len(d) == 2 and d[0].state == FAILED)
        assert all(d.state == FAILED and d.attempts == 3 and d.last_status_code == 0 for d in done)
    assert "no answer within 1 s" in done[0].last_error
    for sandbox in (first, second):
        await tenant.delete(sandbox.name)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("", "BAD_WEBHOOK_URL"),
        ("ftp://hooks.example.com/x", "BAD_WEBHOOK_URL"),
        ("hooks.example.com/x", "BAD_WEBHOOK_URL"),
        ("https://user:secret@hooks.example.com/x", "BAD_WEBHOOK_URL"),
        ("https://hooks.example.com:99999/x", "BAD_WEBHOOK_URL"),
        ("http://169.254.169.254/latest/meta-data", "WEBHOOK_TARGET_NOT_ALLOWED"),
        ("http://10.1.2.3/hook", "WEBHOOK_TARGET_NOT_ALLOWED"),
        ("http://[::1]:8080/hook", "WEBHOOK_TARGET_NOT_ALLOWED"),
        ("http://[::ffff:10.0.0.1]/hook", "WEBHOOK_TARGET_NOT_ALLOWED"),
    ],
)
async def test_bad_webhook_urls_are_invalid_argument(tenant, url, reason):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tenant.webhook(url)
    assert (refused.value.code(), error_info(refused.value).reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_other_bad_webhook_requests_get_clear_statuses(tenant):
    cases = [
        (tenant.webhook("https://hooks.example.com/x", 42), grpc.StatusCode.INVALID_ARGUMENT),
        (tenant.webhook("https://hooks.example.com/x", labels={"Bad Key": "x"}), grpc.StatusCode.INVALID_ARGUMENT),
        (tenant.deliveries("webhooks/wh-0123456789ab"), grpc.StatusCode.NOT_FOUND),
        (tenant.deliveries("webhooks/../../etc"), grpc.StatusCode.NOT_FOUND),
        (tenant.deliveries("hooks/wh-0123456789ab"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            tenant.hooks.DeleteWebhook(hooks.DeleteWebhookRequest(name="webhooks/wh-0123456789ab"), metadata=tenant.md),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == code
    for _ in range(20):
        await tenant.webhook("https://hooks.example.com/x")
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await tenant.webhook("https://hooks.example.com/x")
    assert (full.value.code(), error_info(full.value).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WEBHOOK_LIMIT")


async def test_webhooks_over_http(installation, tenant, receiver):
    base = f"http://{installation.settings['gateway']['http_listen']}"
    async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {tenant.caller.key}"}) as http:
        body = {"url": f"{receiver.url}/ok", "eventTypes": ["SANDBOX_EVENT_TYPE_CREATED"], "labels": tenant.label}
        async with http.post("/v1/webhooks", json=body) as reply:
            made = await reply.json()
            assert reply.status == 200, made
        name = made["webhook"]["name"]
        sandbox = await tenant.create()
        await receiver.wait_for("ok", 1)
        await tenant.until_deliveries(name, lambda d: d and d[0].state == SUCCEEDED)
        async with http.get(f"/v1/{name}/deliveries") as reply:
            (delivery,) = (await reply.json())["deliveries"]
        async with http.get("/v1/webhooks") as reply:
            assert [w["name"] for w in (await reply.json())["webhooks"]] == [name]
        async with http.delete(f"/v1/{name}") as reply:
            assert reply.status == 200
        async with http.get(f"/v1/{name}") as reply:
            assert reply.status == 404
    assert made["secret"].startswith("whsec_") and delivery["event"]["sandbox"] == sandbox.name
    assert delivery["state"] == "WEBHOOK_DELIVERY_STATE_SUCCEEDED"
    await tenant.delete(sandbox.name)


async def test_two_replicas_deliver_each_event_once_and_a_restart_loses_and_repeats_nothing(
    installation, tenant, receiver
):
    records = Records(etcd_client_for(installation.etcd_endpoint))
    listen = {"listen": "127.0.0.1:0", **GATEWAY}
    http_listen = installation.settings["gateway"]["http_listen"]  # the first gateway's, bound by start_installation
    await installation.start("gateway", key="gateway-2", http_listen="127.0.0.1:0", **listen)
    made = await tenant.webhook(f"{receiver.url}/ok", CREATED, FAILED_EVENT)
    ident = made.webhook.name.split("/")[1]
    first = await tenant.create()
    await receiver.wait_for("ok", 1)
    lock = await records.get(WEBHOOK_LOCKS, tenant.name, ident)
    assert lock is not None and lock.message.instance_id.startswith("gateway-")
    # Every gateway stops; meanwhile the first sandbox's VM dies (compute records it): an event nobody delivers yet.
    for key in ("gateway-2", "gateway"):
        await installation.stop(key)
    vm = (await records.get(VMS, first.node, sandbox_key(tenant.name, first.name.split("/")[1]))).message
    os.kill(vm.pid, signal.SIGKILL)
    await installation.start("gateway", http_listen=http_listen, **listen)
    tenant.caller = Caller(await installation.address("gateway"), tenant.caller.key)
    tenant.hooks = webhook_service_pb2_grpc.WebhookServiceStub(tenant.caller.channel)
    second = await tenant.create()
    posts = await receiver.wait_for("ok", 3)
    assert [(p.event["type"], p.event["sandbox"]) for p in posts] == [
        ("SANDBOX_EVENT_TYPE_CREATED", first.name),
        ("SANDBOX_EVENT_TYPE_FAILED", first.name),
        ("SANDBOX_EVENT_TYPE_CREATED", second.name),
    ]
    await asyncio.sleep(1)
    assert max(receiver.attempts.values()) == 1 and len(receiver.on("ok")) == 3
    for sandbox in (first, second):
        await tenant.delete(sandbox.name)
