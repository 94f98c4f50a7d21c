"""``KEY=VALUE`` env files as the local stack writes them (``.zvt/local.env``, ``.zvt/fleet.env``):
values shell-quoted, mode 0600 because they hold secrets."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

__all__ = ["read_env", "write_env"]


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (values shell-quoted); {} when there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value]
        out[key.strip()] = " ".join(words)
    return out


def write_env(path: Path, values: Mapping[str, str], comment: str) -> None:
    """Write ``values`` to ``path`` with mode 0600 (it holds secrets), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {comment}\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
