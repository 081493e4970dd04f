"""The SDK's events and webhooks (microvm_sandbox.events, .webhooks, .events_sync) against a whole installation (fake
VMM) whose gateway may deliver to 127.0.0.0/8; async and sync."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from microvm_sandbox import AsyncClient, AsyncSandbox, Client, SandboxEvent, verify_signature
from microvm_sandbox.errors import InvalidArgumentError, NotFoundError
from tests.inprocess import InProcessNode, fake_image_root, start_installation, tenant_caller
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def installation(etcd_server):
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-sdk-events-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
    node.settings["gateway"] = {"webhook_allowed_networks": ["127.0.0.0/8"], "webhook_retry_seconds": 0.2}
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture
async def client(installation):
    caller = await tenant_caller(installation, f"sdkev-{uuid.uuid4().hex[:8]}")
    client = AsyncClient(await installation.address("gateway"), caller.key)
    yield client
    await client.close()
    await caller.channel.close()


async def test_watch_yields_typed_events_and_resumes_from_a_cursor(client):
    stream = client.events.watch(types=["created", "DELETED"], labels={"sdk": "yes"})
    events = stream.__aiter__()
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0.5)  # the watch is in place
    sandbox = await AsyncSandbox.create(labels={"sdk": "yes"}, client=client)
    created = await asyncio.wait_for(first, 30)
    await sandbox.kill()
    deleted = await asyncio.wait_for(events.__anext__(), 30)
    await stream.close()
    assert isinstance(created, SandboxEvent) and (created.type, created.sandbox_id) == ("created", sandbox.id)
    assert (deleted.type, deleted.state, deleted.labels) == ("deleted", "UNSPECIFIED", {"sdk": "yes"})
    assert stream.cursor == deleted.cursor and created.time.tzinfo is not None
    # What happened since a cursor, then the stream ends by itself.
    missed = [e async for e in client.events.watch(since=created.cursor, follow=False, types=["deleted"])]
    assert [e.cursor for e in missed] == [deleted.cursor]
    with pytest.raises(ValueError):
        client.events.watch(types=["exploded"])


async def test_webhooks_are_managed_and_their_posts_verified(client):
    receiver = await Receiver().start()
    try:
        hook = await client.webhooks.create(f"{receiver.url}/ok", types=["created"], labels={"hook": "sdk"})
        assert hook.secret.startswith("whsec_") and hook.types == ["created"]
        listed = await client.webhooks.list()
        assert [h.id for h in listed] == [hook.id] and not listed[0].secret
        sandbox = await AsyncSandbox.create(labels={"hook": "sdk"}, client=client)
        (post,) = await receiver.wait_for("ok", 1)
        assert verify_signature(hook.secret, post.headers, post.body)
        assert not verify_signature(hook.secret, post.headers, post.body + b" ")
        assert not verify_signature("whsec_other", post.headers, post.body)
        stale = {**post.headers, "X-Mvm-Timestamp": str(int(time.time()) - 3600)}
        assert not verify_signature(hook.secret, stale, post.body)
        for _ in range(100):
            (delivery,) = await client.webhooks.deliveries(hook.id) or (None,)
            if delivery is not None and delivery.state == "succeeded":
                break
            await asyncio.sleep(0.1)
        assert (delivery.event.sandbox_id, delivery.attempts, delivery.last_status_code) == (sandbox.id, 1, 200)
        assert (await client.webhooks.get(hook.name)).cursor == delivery.event.cursor
        await client.webhooks.delete(hook.id)
        with pytest.raises(NotFoundError):
            await client.webhooks.get(hook.id)
        with pytest.raises(InvalidArgumentError):
            await client.webhooks.create("ftp://example.com/x")
        await sandbox.kill()
    finally:
        await receiver.stop()


async def test_the_sync_api_mirrors_the_async_one(installation, client):
    key = client.metadata[0][1].removeprefix("Bearer ")

    def use() -> tuple:
        with Client(client.address, key) as sync:
            hook = sync.webhooks.create("https://hooks.example.com/mvm", types=["failed"])
            listed = [h.id for h in sync.webhooks.list()]
            deliveries = sync.webhooks.deliveries(hook.id)
            sync.webhooks.delete(hook.id)
            with sync.events.watch(since=start, follow=False) as stream:
                events = [(e.type, e.sandbox_id) for e in stream]
            return hook, listed, deliveries, events

    start = await _cursor_now(client)
    sandbox = await AsyncSandbox.create(client=client)
    hook, listed, deliveries, events = await asyncio.to_thread(use)
    assert listed == [hook.id] and deliveries == []
    assert events == [("created", sandbox.id), ("started", sandbox.id)]
    await sandbox.kill()


async def _cursor_now(client: AsyncClient) -> str:
    stream = client.events.watch(follow=False)
    async for _ in stream:
        pass
    return stream.cursor
