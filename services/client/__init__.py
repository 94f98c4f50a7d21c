"""Python client of the public API (v1), sync (``Client``) and async (``AsyncClient``).

Keeps the seeds' interface: ``place_order(OrderRequest) -> OrderResult``. The base URL and
the API key come from the arguments or from ``ZVT_GATEWAY_URL`` and ``ZVT_API_KEY``. Every
error answer raises ``ApiError`` with its HTTP status and the problem's ``code``.

    with Client() as zvt:
        result = zvt.place_order(OrderRequest(portfolio_id="p1", symbol="BTC/USDT", side="buy",
                                              quantity=Decimal("0.1")), wait=5)
"""

from services.client.client import AsyncClient, Client
from services.client.models import ApiError, Fill, OrderRequest, OrderResult

__all__ = ["ApiError", "AsyncClient", "Client", "Fill", "OrderRequest", "OrderResult"]
