"""Local infrastructure for development and tests (Redis, Redis Cluster, PostgreSQL) on 127.0.0.1.

Command line: ``python -m devstack start|stop|status [--only single|cluster|postgres]``.
The Python API lives in :mod:`devstack.stack`.
"""
