"""`python -m services.auth`: runs the auth service."""

from services.auth.server import wire
from services.common.server import run_service
from services.common.settings import AuthSettings

if __name__ == "__main__":
    run_service("auth", AuthSettings, wire)
