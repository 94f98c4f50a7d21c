"""Python client of the public API (v1), sync (``Client``) and async (``AsyncClient``).

Keeps the seeds' interface: ``place_order(OrderRequest) -> OrderResult``. The base URL and
the API key come from the arguments or from ``ZVT_GATEWAY_URL`` and ``ZVT_API_KEY``. Every
error answer raises ``ApiError`` with its HTTP status and the problem's ``code`` (a ``503``
or ``429`` with its ``retry_after``). Idle connections are reused for at most 2 s (below the
gateway's keep-alive), and ``place_order`` (idempotent by ``client_order_id``), ``GET`` and
``PUT`` calls are sent again, a bounded number of times, after a transport error lost their
answer (docs/api.md, "Python client").

    with Client() as zvt:
        result = zvt.place_order(OrderRequest(portfolio_id="p1", symbol="BTC/USDT", side="buy",
                                              quantity=Decimal("0.1")), wait=5)
"""

from services.client.client import AsyncClient, Client
from services.client.models import ApiError, Fill, OrderRequest, OrderResult

__all__ = ["ApiError", "AsyncClient", "Client", "Fill", "OrderRequest", "OrderResult"]
