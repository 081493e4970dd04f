"""ExposureRules: where a node lets sandbox ports be exposed, from its settings.

Host addresses come from `network.expose_host_addresses` (default 127.0.0.1 only; a wildcard such as 0.0.0.0
or a public address only when the operator lists it) and host ports from `network.expose_port_range` (default
30000-32767). The network service checks every ExposePort against them and listens on nothing else, whatever
a record says. A request outside them is INVALID_ARGUMENT (`HOST_ADDRESS_NOT_ALLOWED`, `HOST_PORT_OUT_OF_RANGE`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.settings import NetworkSettings


def parse_host_address(text: str) -> str:
    """`text` in canonical form (so `::0:1` and `::1` are one address); empty stays empty."""
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidArgument(f"host_address {text!r} is not an IP address", reason="INVALID_HOST_ADDRESS") from None


def check_ports(guest_port: int, host_port: int) -> None:
    """The bounds of the fields themselves (1..65535, and 0..65535 where 0 means any)."""
    if not 1 <= guest_port <= 65535:
        raise InvalidArgument(f"guest_port must be between 1 and 65535, got {guest_port}", reason="INVALID_PORT")
    if not 0 <= host_port <= 65535:
        raise InvalidArgument(f"host_port must be between 0 and 65535, got {host_port}", reason="INVALID_PORT")


@dataclass(frozen=True)
class ExposureRules:
    addresses: tuple[str, ...]
    ports: range

    @classmethod
    def from_settings(cls, settings: NetworkSettings) -> ExposureRules:
        return cls(tuple(parse_host_address(a) for a in settings.expose_host_addresses), settings.expose_ports)

    @property
    def port_bounds(self) -> str:
        return f"{self.ports.start}-{self.ports.stop - 1}"

    def host_address(self, requested: str) -> str:
        """The address to bind for a request: the first allowed one when none is asked for."""
        address = parse_host_address(requested) or self.addresses[0]
        if address not in self.addresses:
            raise InvalidArgument(
                f"host_address {address} is not one this node exposes ports on; allowed: {', '.join(self.addresses)} "
                "(network.expose_host_addresses)",
                reason="HOST_ADDRESS_NOT_ALLOWED",
                metadata={"allowed": ",".join(self.addresses)},
            )
        return address

    def check_host_port(self, host_port: int) -> None:
        """0 (any free port of the range) or a port of the range."""
        if host_port and host_port not in self.ports:
            raise InvalidArgument(
                f"host_port {host_port} is outside {self.port_bounds} (network.expose_port_range); 0 picks a free one",
                reason="HOST_PORT_OUT_OF_RANGE",
                metadata={"range": self.port_bounds},
            )

    def allows(self, host_address: str, host_port: int) -> bool:
        """Whether a recorded mapping may be listened on (records made before the rules were narrowed may not)."""
        return host_address in self.addresses and host_port in self.ports
