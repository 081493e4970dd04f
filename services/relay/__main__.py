"""`python -m services.relay`: runs the relay service."""

from services.common.server import run_service
from services.common.settings import RelaySettings
from services.relay.server import wire

if __name__ == "__main__":
    run_service("relay", RelaySettings, wire)
