"""`python -m services.network`: runs the network service."""

from services.common.server import run_service
from services.common.settings import NetworkSettings
from services.network.server import wire

if __name__ == "__main__":
    run_service("network", NetworkSettings, wire)
