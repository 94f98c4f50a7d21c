"""The HTTP gateway: the public API (ARCHITECTURE section 8) in front of the order pipeline."""

from services.gateway.app import create_app
from services.gateway.gateway import Gateway
from services.gateway.settings import GatewaySettings

__all__ = ["Gateway", "GatewaySettings", "create_app"]
