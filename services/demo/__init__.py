"""The main job of the local stack (``make up``): ``python -m services.demo``.

Drives the running fleet through the public HTTP API with the Python client, the way a
user would: creates portfolios, places a mix of market and limit orders (some that fill,
some that rest and are canceled, some that risk rejects), waits for their terminal statuses
and prints what happened. ``services.demo.webhooks`` is the local webhook receiver the
notifications service posts to in the local stack.
"""
