"""What a load against a stack saw (tests/load.py), and what counts as lost."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

# Failures a caller must expect while a process of the stack is down: retried with back-off.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Statuses that say the server did not know what happened: always findings.
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_FINDINGS = 40  # details kept in the tally (all are counted)


@dataclass
class Tally:
    """What the load saw. These must stay zero:
    - sandboxes_lost: a sandbox created and acknowledged, not deleted by the load, gone or FAILED afterwards (or a
      delete of it answering NOT_FOUND at its first attempt);
    - streams_without_status: an Exec stream that ended OK without its `exited` event, or an Exec or ReadFile
      stream cut with UNKNOWN/INTERNAL;
    - records_lost: a record the load knows must exist (sandbox, snapshot) missing from etcd or the API, or a file
      written and acknowledged that reads back with other content;
    - outputs_wrong: an Exec that ended with an exit status other than 0, or output other than its command prints;
    - broken: any call answered INTERNAL or UNKNOWN.
    """

    operations: Counter = field(default_factory=Counter)
    transient: Counter = field(default_factory=Counter)  # "op:CODE" retried
    transient_outside_kills: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)  # "op:CODE" given up on (not transient, or retried too long)
    broken: Counter = field(default_factory=Counter)
    sandboxes_lost: int = 0
    streams_without_status: int = 0
    records_lost: int = 0
    outputs_wrong: int = 0
    creates_not_acknowledged: int = 0
    findings: list[str] = field(default_factory=list)
    kills: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        """Seconds since the tally began (findings and kills are stamped with it)."""
        return round(time.monotonic() - self.started, 1)

    def finding(self, text: str) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(f"[{self.now()}s] {text}")

    @property
    def losses(self) -> dict[str, int]:
        return {
            "sandboxes_lost": self.sandboxes_lost,
            "streams_without_status": self.streams_without_status,
            "records_lost": self.records_lost,
            "outputs_wrong": self.outputs_wrong,
            "broken_statuses": sum(self.broken.values()),
        }

    def as_json(self, **extra) -> str:
        return json.dumps(
            {
                **extra,
                **self.losses,
                "operations": dict(self.operations),
                "operations_total": sum(self.operations.values()),
                "transient_retried": dict(self.transient),
                "transient_outside_kill_windows": dict(self.transient_outside_kills),
                "failed": dict(self.failed),
                "broken": dict(self.broken),
                "creates_not_acknowledged": self.creates_not_acknowledged,
                "kills": self.kills,
                "findings": self.findings,
            },
            sort_keys=False,
        )
