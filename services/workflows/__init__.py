"""Hatchet workflows: the durable path (``trading.place_order``, ``portfolio.rebalance``,
``risk.monitor``, ``market_data.process``, ``orders.reconcile``) and the worker that runs them.

Every task calls the same stage handler the stream service calls, and commits what it decided
with ``Bus.apply``: the stage's state writes, its output events (``route: workflow``) and the
stage group's dedupe mark for the input, all or nothing, and only if the stage's state in that
shard has not moved since it was read. Stream stages check the same version, so the two paths
never overwrite each other's state, and an event is handled once whichever path gets it.
"""
