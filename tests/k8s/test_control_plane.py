"""``python -m devstack k8s -- CMD``: a control plane in a private network namespace for as
long as CMD runs, with KUBECONFIG, helm and kubectl; CMD's exit status passed on; nothing left
running or on disk after a success."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.conftest import CHART, ROOT, Cluster

pytestmark = pytest.mark.timeout(300)

PROBE = r"""
import json, os, socket, subprocess
nodes = json.loads(subprocess.run(["kubectl", "get", "nodes", "-o", "json"], check=True, capture_output=True).stdout)
version = json.loads(subprocess.run(["kubectl", "version", "-o", "json"], check=True, capture_output=True).stdout)
helm = subprocess.run(["helm", "version", "--template", "{{.Version}}"], check=True, capture_output=True, text=True).stdout
try:
    socket.create_connection(("127.0.0.1", int(os.environ["HOST_PORT"])), timeout=2).close()
    host_reachable = True
except OSError:
    host_reachable = False
print(json.dumps({
    "ready": sorted(n["metadata"]["name"] for n in nodes["items"]
                    if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])),
    "server": version["serverVersion"]["gitVersion"], "helm": helm, "host_reachable": host_reachable,
    "logs": os.environ["ZVT_K8S_LOGS"], "kubeconfig": os.environ["KUBECONFIG"],
}))
"""


def _devstack(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devstack", "k8s", "--", *cmd], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})})


def _kept_dir(stderr: str) -> Path:
    found = re.search(r"state and logs stay in (\S+)", stderr)
    assert found, stderr
    return Path(found.group(1))


def test_k8s_when_cmd_runs_it_sees_ready_nodes_helm_and_no_host_network_then_all_is_gone(cluster: Cluster) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:  # open on this host's loopback, not in there
        proc = _devstack(sys.executable, "-c", PROBE, env={"HOST_PORT": str(listening.getsockname()[1])})
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout)
    assert seen["ready"] == ["kwok-node-0", "kwok-node-1", "kwok-node-2"]
    assert seen["server"] == "v1.37.2"
    assert seen["helm"] == "v3.22.0"
    assert seen["host_reachable"] is False  # its own network namespace: only its loopback
    workdir = Path(seen["logs"]).parent
    assert not workdir.exists()  # removed after a success
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftovers.stdout == "", f"processes of the control plane left running: {leftovers.stdout}"


def test_k8s_when_cmd_fails_passes_its_status_on_and_keeps_the_logs(cluster: Cluster) -> None:
    proc = _devstack("sh", "-c", "kubectl get namespace default -o name && exit 7")
    assert proc.returncode == 7, proc.stderr[-4000:]
    assert proc.stdout.strip() == "namespace/default"
    kept = _kept_dir(proc.stderr)
    try:
        assert (kept / "logs" / "kube-apiserver.log").is_file()
        assert subprocess.run(["pgrep", "-f", str(kept)], capture_output=True).stdout == b""
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_k8s_when_cmd_does_not_exist_exits_127(cluster: Cluster) -> None:
    proc = _devstack("no-such-command-zvt")
    assert proc.returncode == 127
    assert "cannot run no-such-command-zvt" in proc.stderr
    shutil.rmtree(_kept_dir(proc.stderr), ignore_errors=True)


def test_helm_when_built_by_the_project_renders_without_kube_version(cluster: Cluster) -> None:
    """The chart's kubeVersion (>=1.30) holds against helm's own default: the build links the
    Kubernetes version of its client-go in (a plain build says v1.20 and refuses the chart)."""
    proc = subprocess.run([str(cluster.helm), "template", "zvt", str(CHART)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kind: Deployment" in proc.stdout
