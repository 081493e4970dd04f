"""`python -m services.compute`: runs the compute service."""

from services.common.server import run_service
from services.common.settings import ComputeSettings
from services.compute.server import wire

if __name__ == "__main__":
    run_service("compute", ComputeSettings, wire)
