"""`python -m services.gateway`: runs the gateway service."""

from services.common.server import run_service
from services.common.settings import GatewaySettings
from services.gateway.server import interceptors, wire

if __name__ == "__main__":
    run_service("gateway", GatewaySettings, wire, interceptors=interceptors)
