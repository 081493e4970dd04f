"""What every command handler gets: the gateway, the API key and one SDK client, made on first use (so `-h` and
`mvm completion` need neither a key nor a gateway)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm_sandbox import Client, Sandbox, SandboxError
from microvm_sandbox.aio import AsyncSandbox, default_api_key, sandbox_name, snapshot_name
from mvm_cli.output import error_line, exit_status, short
from mvm_cli.parsing import CliError


class Context:
    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self._key: str | None = None
        self._client: Client | None = None

    @property
    def key(self) -> str:
        """$MVM_API_KEY, else the admin key `make up` wrote into the state dir (the SDK's rule)."""
        if self._key is None:
            try:
                self._key = default_api_key()
            except SandboxError as error:
                raise CliError(error.message, status=1) from None
        return self._key

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.gateway, self.key)
        return self._client

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """The sandbox, looked up (SandboxNotFound names it when it does not exist); a paused one stays paused."""
        return Sandbox.connect(sandbox_id, client=self.client, resume=False)

    def sandbox_by_name(self, sandbox_id: str) -> Sandbox:
        """A handle on the sandbox without asking the server first (for calls that say themselves if it is gone)."""
        return Sandbox(AsyncSandbox(self.client.aio, sandbox_pb2.Sandbox(name=sandbox_name(sandbox_id))))

    def snapshot_message(self, snapshot: str) -> sandbox_pb2.Snapshot:
        """The snapshot's message (SnapshotNotFound names it when it does not exist)."""
        request = api.GetSnapshotRequest(name=snapshot_name(snapshot))
        return self.client.call("GetSnapshot", request, idempotent=True).snapshot

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def for_each(ids: Iterable[str], action: Callable[[str], str], verb: str, noun: str = "sandbox") -> int:
    """Runs `action(id)` for every id, going on after a failure: prints what it returned (one line per id) or
    `mvm: <verb> <id>: <error>`, then, if any failed, a summary. Exit status: 0, 2 when every failure was
    NOT_FOUND, else 1."""
    ids = list(ids)
    statuses = []
    for each in ids:
        try:
            print(action(each), flush=True)
        except (SandboxError, CliError) as error:
            print(f"mvm: {verb} {short(each)}: {error_line(error)}", file=sys.stderr, flush=True)
            statuses.append(exit_status(error))
    if not statuses:
        return 0
    plural = noun if len(ids) == 1 else {"sandbox": "sandboxes"}.get(noun, noun + "s")
    print(f"mvm: {verb}: {len(statuses)} of {len(ids)} {plural} failed", file=sys.stderr)
    return 2 if all(status == 2 for status in statuses) else 1
