"""The platform every service stands on: events and codec (``events``, ``codec``), the sharded
Redis Streams bus (``bus``, ``keys``), settings, telemetry, the Redis connection and the
service runtime (``runtime``). Import from the modules; this package re-exports nothing."""
