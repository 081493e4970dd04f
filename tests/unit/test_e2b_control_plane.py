"""The E2B control plane (services/gateway/e2b/control_plane.py) driven by the unmodified e2b SDK, against an
in-process installation (fake VMM): create, get_info, list with filters, set_timeout, connect, pause and resume,
metrics, kill; and the raw HTTP answers for bad input, in E2B's error shape."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from e2b import AsyncSandbox, AsyncTemplate, Sandbox, SandboxQuery, SandboxState
from e2b.api.client.models import SandboxLogs, SandboxLogsV2Response
from e2b.exceptions import AuthenticationException, NotFoundException

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b import access_token

pytestmark = pytest.mark.timeout(120)


async def test_create_with_e2b_template_name_metadata_and_envs_makes_our_sandbox(doors):
    sandbox = await AsyncSandbox.create("base", timeout=300, metadata={"team": "red"}, envs={"GREETING": "hi"})
    try:
        ours = await doors.alice.stub.GetSandbox(
            api.GetSandboxRequest(name=f"sandboxes/{sandbox.sandbox_id}"), metadata=doors.alice.metadata, timeout=10
        )
        assert ours.sandbox.template == "default"  # `base` is an alias of our `default`
        assert dict(ours.sandbox.labels) == {"team": "red"}
        assert dict(ours.sandbox.env) == {"GREETING": "hi"}
        info = await sandbox.get_info()
        assert (info.sandbox_id, info.template_id, info.metadata) == (sandbox.sandbox_id, "default", {"team": "red"})
        assert info.state == SandboxState.RUNNING
        assert (info.end_at - info.started_at).total_seconds() == pytest.approx(300, abs=5)
    finally:
        await sandbox.kill()


async def test_our_template_names_work_as_themselves_and_unknown_ones_are_refused(doors):
    sandbox = await AsyncSandbox.create("default", timeout=60)
    try:
        assert (await sandbox.get_info()).template_id == "default"
    finally:
        await sandbox.kill()
    status, body = await doors.call("POST", "/v2/sandboxes", json={"templateID": "no-such-template", "timeout": 60})
    assert status in (400, 404) and body["code"] == status and "no-such-template" in body["message"]


async def test_list_filters_by_metadata_and_state(doors):
    run = uuid.uuid4().hex[:8]
    first = await AsyncSandbox.create("base", timeout=120, metadata={"run": run, "which": "first"})
    second = await AsyncSandbox.create("base", timeout=120, metadata={"run": run, "which": "second"})
    try:
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"run": run}))
        found = await paginator.next_items()
        assert {s.sandbox_id for s in found} == {first.sandbox_id, second.sandbox_id}
        only = await AsyncSandbox.list(query=SandboxQuery(metadata={"run": run, "which": "second"})).next_items()
        assert [s.sandbox_id for s in only] == [second.sandbox_id]
        paused = AsyncSandbox.list(query=SandboxQuery(metadata={"run": run}, state=[SandboxState.PAUSED]))
        assert await paused.next_items() == []
        started = (await first.get_info()).started_at
        for query, expected in (
            (SandboxQuery(metadata={"run": run}, template="base"), {first.sandbox_id, second.sandbox_id}),
            (SandboxQuery(metadata={"run": run}, template="desktop"), set()),
            (SandboxQuery(metadata={"run": run}, started_after=started), {first.sandbox_id, second.sandbox_id}),
            (SandboxQuery(metadata={"run": run}, started_after=started + timedelta(days=1)), set()),
        ):
            assert {s.sandbox_id for s in await AsyncSandbox.list(query=query).next_items()} == expected, query
    finally:
        await first.kill()
        await second.kill()


async def test_list_pages_follow_the_next_token(doors):
    run = uuid.uuid4().hex[:8]
    created = [await AsyncSandbox.create("base", timeout=120, metadata={"page": run}) for _ in range(3)]
    try:
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"page": run}), limit=2)
        pages = []
        while paginator.has_next:
            pages.append([s.sandbox_id for s in await paginator.next_items()])
        assert len(pages) >= 2 and len(pages[0]) == 2
        assert sorted(sum(pages, [])) == sorted(s.sandbox_id for s in created)
    finally:
        for sandbox in created:
            await sandbox.kill()


async def test_set_timeout_moves_the_sandbox_end(doors):
    sandbox = await AsyncSandbox.create("base", timeout=60)
    try:
        before = (await sandbox.get_info()).end_at
        await sandbox.set_timeout(3600)
        after = await sandbox.get_info()
        assert (after.end_at - before).total_seconds() > 3000
    finally:
        await sandbox.kill()


async def test_connect_returns_the_sandbox_with_an_access_token_for_it(doors):
    sandbox = await AsyncSandbox.create("base", timeout=120)
    try:
        again = await AsyncSandbox.connect(sandbox.sandbox_id)
        assert again.sandbox_id == sandbox.sandbox_id
        token = again.connection_config.sandbox_headers["X-Access-Token"]
        assert access_token.sandbox_scope(token) == sandbox.sandbox_id  # for this sandbox only
    finally:
        await sandbox.kill()


async def test_pause_then_connect_resumes(doors):
    sandbox = await AsyncSandbox.create("base", timeout=120)
    try:
        assert await sandbox.pause() is True
        assert (await sandbox.get_info()).state == SandboxState.PAUSED
        listed = await AsyncSandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sandbox.sandbox_id in {s.sandbox_id for s in listed}
        assert await sandbox.pause() is False  # already paused: the SDK's answer to 409
        resumed = await AsyncSandbox.connect(sandbox.sandbox_id)
        assert (await resumed.get_info()).state == SandboxState.RUNNING
    finally:
        await sandbox.kill()


async def test_metrics_answer_a_list(doors):
    sandbox = await AsyncSandbox.create("base", timeout=120)
    try:
        metrics = await sandbox.get_metrics()
        assert isinstance(metrics, list)
        assert all(m.cpu_count >= 1 for m in metrics)
    finally:
        await sandbox.kill()


async def test_kill_removes_the_sandbox_and_a_second_kill_says_so(doors):
    sandbox = await AsyncSandbox.create("base", timeout=120)
    assert await AsyncSandbox.kill(sandbox.sandbox_id) is True
    with pytest.raises(NotFoundException):
        await AsyncSandbox.get_info(sandbox.sandbox_id)
    assert await AsyncSandbox.kill(sandbox.sandbox_id) is False


async def test_the_sync_sdk_works_from_a_thread(doors):
    def lifecycle() -> tuple[str, str, bool]:
        sandbox = Sandbox.create("base", timeout=60, metadata={"sync": "yes"})
        info = sandbox.get_info()
        return info.sandbox_id, info.metadata["sync"], sandbox.kill()

    sandbox_id, label, killed = await asyncio.to_thread(lifecycle)
    assert sandbox_id and label == "yes" and killed is True


async def test_a_wrong_key_is_an_authentication_error_in_the_sdk(doors):
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create("base", timeout=60, api_key="e2b_" + "0" * 40)


async def test_bad_input_answers_e2b_error_shapes(doors):
    status, body = await doors.call("POST", "/v2/sandboxes", data=b"{not json", headers={"Content-Type": "x"})
    assert status == 400 and body["code"] == 400 and "JSON" in body["message"]
    status, body = await doors.call("POST", "/v2/sandboxes", json={"timeout": 60})
    assert (status, body["code"]) == (400, 400) and "templateID" in body["message"]
    status, body = await doors.call("POST", "/v2/sandboxes", json={"templateID": "base", "timeout": "soon"})
    assert status == 400 and "timeout" in body["message"]
    status, body = await doors.call("GET", "/v2/sandboxes", key="")
    assert status == 401 and body == {"code": 401, "message": body["message"]} and "X-API-Key" in body["message"]
    status, body = await doors.call("GET", "/v2/sandboxes", key="mvm_nope_nope")
    assert (status, body["code"]) == (401, 401)


async def test_another_tenants_sandbox_is_404_exactly_as_a_missing_one(doors):
    sandbox = await AsyncSandbox.create("base", timeout=120)
    try:
        for verb, path, body in (
            ("GET", "/sandboxes/{}", None),
            ("DELETE", "/sandboxes/{}", None),
            ("POST", "/sandboxes/{}/timeout", {"timeout": 60}),
            ("POST", "/sandboxes/{}/pause", None),
            ("POST", "/v2/sandboxes/{}/connect", {"timeout": 60}),
        ):
            theirs = await doors.call(verb, path.format(sandbox.sandbox_id), key=doors.bob.key, json=body)
            missing = await doors.call(verb, path.format("sbx-nosuchsandbox"), key=doors.bob.key, json=body)
            assert theirs[0] == missing[0] == 404, (verb, path, theirs, missing)
            assert theirs[1]["code"] == 404
        assert (await sandbox.get_info()).state == SandboxState.RUNNING  # bob's kill and pause did nothing
    finally:
        await sandbox.kill()


async def test_what_we_do_not_serve_is_501_naming_the_feature(doors):
    for verb, path, body, feature in (
        ("GET", "/volumes", None, "volumes"),
        ("GET", "/templates/x", None, "template"),  # a template with its builds
        ("PATCH", "/v2/templates/x", {"public": True}, "template"),
        ("GET", "/secrets", None, "secrets"),
        ("POST", "/v2/sandboxes", {"templateID": "base", "mcp": {"x": {}}}, "MCP"),
        ("POST", "/v2/sandboxes", {"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}, "volumes"),
        ("POST", "/v2/sandboxes", {"templateID": "base", "autoPause": True}, "auto-pause"),
        ("POST", "/v2/sandboxes", {"templateID": "base", "autoResume": {"enabled": True}}, "auto-resume"),
    ):
        status, answer = await doors.call(verb, path, json=body)
        assert status == 501 and answer["code"] == 501 and feature in answer["message"], (path, answer)
    status, answer = await doors.call("GET", "/no/such/route")
    assert status == 404 and answer["code"] == 404


async def test_a_lifecycle_that_kills_on_timeout_is_what_we_do(doors):
    lifecycle = {"on_timeout": "kill", "auto_resume": False}  # autoPause false, autoResume {"enabled": false}
    sandbox = await AsyncSandbox.create("base", timeout=60, lifecycle=lifecycle)
    await sandbox.kill()


async def test_allow_internet_access_maps_to_our_egress_policy(doors):
    status, body = await doors.call(
        "POST", "/v2/sandboxes", json={"templateID": "base", "timeout": 60, "allow_internet_access": False}
    )
    assert status == 201, body
    name = f"sandboxes/{body['sandboxID']}"
    try:
        ours = await doors.alice.stub.GetSandbox(api.GetSandboxRequest(name=name), metadata=doors.alice.metadata)
        assert ours.sandbox.network_policy.egress == sandbox_pb2.EGRESS_MODE_NONE
        assert body["envdVersion"] and body["envdAccessToken"] and body["clientID"]
    finally:
        await doors.alice.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), metadata=doors.alice.metadata)


async def test_logs_answer_the_console_in_both_shapes_the_sdk_parses(doors):
    sandbox = await AsyncSandbox.create("base", timeout=120)
    try:
        status, v1 = await doors.call("GET", f"/sandboxes/{sandbox.sandbox_id}/logs")
        assert status == 200, v1
        parsed = SandboxLogs.from_dict(v1)
        assert [entry.line for entry in parsed.logs] == [entry.message for entry in parsed.log_entries]
        status, v2 = await doors.call("GET", f"/v2/sandboxes/{sandbox.sandbox_id}/logs?limit=1")
        assert status == 200 and len(SandboxLogsV2Response.from_dict(v2).logs) <= 1
        assert (await doors.call("GET", f"/sandboxes/{sandbox.sandbox_id}/logs", key=doors.bob.key))[0] == 404
    finally:
        await sandbox.kill()


async def test_template_exists_knows_e2b_names_and_ours(doors):
    assert await AsyncTemplate.exists("base") is True  # an alias of our `default`
    assert await AsyncTemplate.exists("default") is True
    assert await AsyncTemplate.exists("no-such-template") is False
    status, body = await doors.call("GET", "/templates/aliases/default", key=doors.bob.key)
    assert (status, body) == (200, {"templateID": "default", "public": False})


async def test_refresh_only_extends_and_the_old_resume_wants_a_paused_sandbox(doors):
    sandbox = await AsyncSandbox.create("base", timeout=60)
    try:
        path = f"/sandboxes/{sandbox.sandbox_id}"
        before = (await sandbox.get_info()).end_at
        assert (await doors.call("POST", path + "/refreshes", json={"duration": 10}))[0] == 204
        assert (await sandbox.get_info()).end_at == before  # ends later already: unchanged
        assert (await doors.call("POST", path + "/refreshes", json={"duration": 3600}))[0] == 204
        assert ((await sandbox.get_info()).end_at - before).total_seconds() > 3000
        status, body = await doors.call("POST", path + "/resume", json={})
        assert (status, body["code"]) == (409, 409)
        await sandbox.pause()
        status, body = await doors.call("POST", path + "/resume", json={})
        assert status == 201 and body["sandboxID"] == sandbox.sandbox_id and body["envdAccessToken"]
        assert (await sandbox.get_info()).state == SandboxState.RUNNING
    finally:
        await sandbox.kill()
