"""The risk service: pre-trade checks of ``order.requested`` (ARCHITECTURE section 7)."""
