"""The recorder: every event of every type, once, into the PostgreSQL event store."""
