"""What a service depends on, checked every few seconds and reported two ways: in grpc.health, one service name per
dependency (`microvm.dependency.<name>`: SERVING or NOT_SERVING), and in the service's registration (metadata
`dependencies`, e.g. `disk=ok etcd=ok vmm=ok`, or `nftables=failed:<why>`), which `mvm-supervisor status` shows.

Every service checks etcd and the disk of its state directory; a wiring adds its own (compute: its VMM; network:
nftables). A check answers None when all is well and a short reason when not; one that takes longer than
CHECK_SECONDS has failed. The service's own health ("") is not changed by a dependency: callers see the details and
decide (a gateway with etcd gone still answers, with UNAVAILABLE, rather than vanishing from a load balancer).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from grpc_health.v1 import health_pb2

log = structlog.get_logger()

CHECK_SECONDS = 5.0
PERIOD_SECONDS = 10.0
HEALTH_PREFIX = "microvm.dependency."
DISK_MIN_FREE_RATIO = 0.05
DISK_MIN_FREE_BYTES = 1 << 30


@dataclass
class Dependency:
    name: str
    check: Callable[[], Awaitable[str | None]]


def etcd_dependency(etcd) -> Dependency:
    async def check() -> str | None:
        await etcd.get(b"/microvm/health-probe")  # a read of a key nobody writes: a round trip, nothing more
        return None

    return Dependency("etcd", check)


def disk_dependency(state_dir: str) -> Dependency:
    async def check() -> str | None:
        path = Path(state_dir)
        while not path.exists() and path != path.parent:
            path = path.parent  # not made yet: the file system it will be on
        usage = await asyncio.to_thread(shutil.disk_usage, path)
        if usage.free < min(DISK_MIN_FREE_BYTES, usage.total * DISK_MIN_FREE_RATIO) or usage.free == 0:
            return f"{usage.free >> 20} MiB free of {usage.total >> 20} MiB on {path}"
        return None

    return Dependency("disk", check)


def command_dependency(name: str, argv: list[str]) -> Dependency:
    """A dependency checked by running a command that must exit 0 (e.g. `nft list tables`)."""

    async def check() -> str | None:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(process.communicate(), CHECK_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            return f"`{' '.join(argv)}` exited {process.returncode}: {err.decode(errors='replace').strip()[:200]}"
        return None

    return Dependency(name, check)


async def check_all(dependencies: list[Dependency]) -> dict[str, str | None]:
    async def one(dependency: Dependency) -> str | None:
        try:
            return await asyncio.wait_for(dependency.check(), CHECK_SECONDS)
        except TimeoutError:
            return f"no answer within {CHECK_SECONDS:g}s"
        except Exception as error:  # the check's own failure is the dependency's
            return f"{type(error).__name__}: {error}"[:300]

    results = await asyncio.gather(*(one(d) for d in dependencies))
    return {d.name: problem for d, problem in zip(dependencies, results, strict=True)}


def summary(results: dict[str, str | None]) -> str:
    return " ".join(
        f"{name}=ok" if problem is None else f"{name}=failed:{problem}" for name, problem in sorted(results.items())
    )


class DependencyHealth:
    """Checks `dependencies` every PERIOD_SECONDS; publishes each in `health` and, when the summary changes, in the
    registration."""

    def __init__(self, dependencies: list[Dependency], health, registration) -> None:
        self.dependencies, self.health, self.registration = dependencies, health, registration
        self.last = ""

    async def refresh(self) -> dict[str, str | None]:
        results = await check_all(self.dependencies)
        for name, problem in results.items():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if problem is None
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self.health.set(HEALTH_PREFIX + name, status)
        text = summary(results)
        if text != self.last:
            if any(problem is not None for problem in results.values()):
                log.warning("dependency_unhealthy", dependencies=text)
            try:
                await self.registration.update_metadata(dependencies=text)
                self.last = text
            except Exception as error:  # etcd itself may be what is down: try again next time
                log.warning("dependency_report_failed", error=str(error))
        return results
