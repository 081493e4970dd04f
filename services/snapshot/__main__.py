"""`python -m services.snapshot`: runs the snapshot service."""

from services.common.server import run_service
from services.common.settings import SnapshotSettings
from services.snapshot.server import wire

if __name__ == "__main__":
    run_service("snapshot", SnapshotSettings, wire)
