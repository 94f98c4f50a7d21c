"""Simulated venue servers: real HTTP servers speaking a real exchange's REST API (Binance
spot, the subset ccxt uses), backed by the paper matching engine. See ``docs/venues.md``."""
