"""`python -m services.snapshot`: runs the snapshot service."""

from services.snapshot.server import wire
from services.common.server import run_service
from services.common.settings import SnapshotSettings

if __name__ == "__main__":
    run_service("snapshot", SnapshotSettings, wire)
