"""A local Kubernetes control plane, in a private network namespace, for the chart's and
``services.ops``' tests and for people: ``python -m devstack k8s -- CMD ARGS...``.

The binaries come from Go modules at pinned releases (``scripts/build-k8s.sh``, cached under
``~/.cache/zvt-fleet/k8s``; helm from ``scripts/build-helm.sh``): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl, and kwok, which plays the kubelets: it keeps
a few fake nodes Ready and takes each scheduled pod to Running (no containers: no logs, exec,
probes or Service traffic). ``run`` enters a new network namespace with only loopback up, so
whatever the API server dials (webhooks, APIServices) fails at once and nothing leaves the
machine; starts the control plane there with certificates made for this run; runs CMD there with
``KUBECONFIG`` set and helm and kubectl first on ``PATH``; and, when CMD exits, kills every
process of the control plane (SIGKILL: a graceful API server waits minutes on a dead etcd) and
passes CMD's exit status on. Each run is its own cluster: runs side by side do not meet.

To reach a running one from outside its namespace (a test process), ``NetnsForward`` listens on
the caller's loopback and dials the target port from inside the namespace.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from devstack.stack import ROOT, DevstackError

__all__ = [
    "API_PORT",
    "ETCD_VERSION",
    "K8S_VERSION",
    "KWOK_VERSION",
    "NODES",
    "ControlPlane",
    "NetnsForward",
    "binaries",
    "enter_private_netns",
    "helm_binary",
    "run",
]

K8S_VERSION = "v1.37.2"
ETCD_VERSION = "v3.7.3"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
API_PORT = 6443
ETCD_PORT = 2379
NODES = (("kwok-node-0", "zone-a"), ("kwok-node-1", "zone-b"), ("kwok-node-2", "zone-c"))
"""The fake nodes kwok keeps Ready: (name, topology.kubernetes.io/zone)."""
SERVICE_CIDR = "10.96.0.0/16"
KWOK_STAGES = ("node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete")
_HOST = "127.0.0.1"
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _build(script: str, env: Mapping[str, str], what: str) -> Path:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=3600, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise DevstackError(f"building {what} failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def binaries() -> Path:
    """Build the pinned control plane unless the cache has it; the folder with ``bin/`` and
    kwok's ``stage/`` files."""
    return _build("build-k8s.sh", {"K8S_VERSION": K8S_VERSION, "ETCD_VERSION": ETCD_VERSION,
                                   "KWOK_VERSION": KWOK_VERSION}, f"Kubernetes {K8S_VERSION}")


def helm_binary() -> Path:
    return _build("build-helm.sh", {"HELM_VERSION": HELM_VERSION}, f"helm {HELM_VERSION}")


# --- the network namespace -------------------------------------------------------------------

def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_private_netns() -> None:
    """Move this process (its calling thread, and so every child started after) into a new
    network namespace with loopback up. Needs root (CAP_SYS_ADMIN)."""
    if _libc().unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise DevstackError(f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (run as root, or under "
                            "`unshare --net --map-root-user`)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


class NetnsForward:
    """Forwards connections to 127.0.0.1:``listen_port`` (0: any free one) of this process's
    network namespace to 127.0.0.1:``port`` of the namespace process ``pid`` is in. A dedicated
    thread joins that namespace (``setns`` is per thread) and opens the upstream sockets; the
    rest of the process stays where it was."""

    def __init__(self, pid: int, port: int, listen_port: int = 0) -> None:
        self._port = port
        self._ns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        self._dials: queue.Queue[queue.Queue[socket.socket | OSError] | None] = queue.Queue()
        joined: queue.Queue[OSError | None] = queue.Queue()
        threading.Thread(target=self._dialer, args=(joined,), name="netns-dialer", daemon=True).start()
        error = joined.get()
        if error is not None:
            os.close(self._ns_fd)
            raise DevstackError(f"cannot join the network namespace of pid {pid}: {error}")
        self._server = socket.create_server((_HOST, listen_port))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept, name="netns-forward", daemon=True).start()

    def _dialer(self, joined: queue.Queue[OSError | None]) -> None:
        if _libc().setns(self._ns_fd, _CLONE_NEWNET) != 0:
            joined.put(OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno())))
            return
        joined.put(None)
        while (reply := self._dials.get()) is not None:
            try:
                reply.put(socket.create_connection((_HOST, self._port), timeout=10))
            except OSError as exc:
                reply.put(exc)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        reply: queue.Queue[socket.socket | OSError] = queue.Queue()
        self._dials.put(reply)
        upstream = reply.get()
        if isinstance(upstream, OSError):
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)

    def close(self) -> None:
        self._server.close()
        self._dials.put(None)
        os.close(self._ns_fd)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()


# --- certificates ------------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1
"""


def _openssl(pki: Path, *args: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=pki, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise DevstackError(f"openssl {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def _make_pki(pki: Path) -> None:
    """A CA for this run, the API server's serving certificate, a client certificate per
    identity, and the service-account signing key (all P-256)."""
    pki.mkdir(parents=True)
    (pki / "openssl.cnf").write_text(_OPENSSL_CNF)

    def key(name: str) -> None:
        _openssl(pki, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")

    key("ca")
    _openssl(pki, "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=zvt-devstack-k8s-ca", "-days", "7",
             "-config", "openssl.cnf", "-extensions", "ca", "-out", "ca.crt")
    for name, subject, kind in (
        ("apiserver", "/CN=kube-apiserver", "server"),
        ("admin", "/O=system:masters/CN=zvt-admin", "client"),
        ("controller-manager", "/CN=system:kube-controller-manager", "client"),
        ("scheduler", "/CN=system:kube-scheduler", "client"),
    ):
        key(name)
        _openssl(pki, "req", "-new", "-key", f"{name}.key", "-subj", subject, "-config", "openssl.cnf",
                 "-out", f"{name}.csr")
        _openssl(pki, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "7",
                 "-extfile", "openssl.cnf", "-extensions", kind, "-out", f"{name}.crt")
    key("service-account")
    _openssl(pki, "pkey", "-in", "service-account.key", "-pubout", "-out", "service-account.pub")


def kubeconfig(server: str, ca: bytes, cert: bytes, key: bytes, user: str = "zvt-admin") -> dict[str, Any]:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "zvt-devstack",
        "clusters": [{"name": "zvt-devstack", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "zvt-devstack", "context": {"cluster": "zvt-devstack", "user": user}}],
    }


# --- the control plane -------------------------------------------------------------------------

def _die_with_parent() -> None:
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ControlPlane:
    """etcd, the API server, controller manager, scheduler and kwok, in the caller's network
    namespace (``enter_private_netns`` first), with their state and logs under ``workdir``."""

    def __init__(self, bin_dir: Path, stage_dir: Path, workdir: Path) -> None:
        self.bin_dir, self.stage_dir, self.workdir = bin_dir, stage_dir, workdir
        self.pki = workdir / "pki"
        self.logs = workdir / "logs"
        self.kubeconfig = workdir / "kubeconfig"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _start(self, name: str, args: Sequence[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        try:
            self._procs[name] = subprocess.Popen(
                [str(self.bin_dir / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _component_kubeconfig(self, name: str) -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(json.dumps(kubeconfig(
            f"https://{_HOST}:{API_PORT}", (self.pki / "ca.crt").read_bytes(),
            (self.pki / f"{name}.crt").read_bytes(), (self.pki / f"{name}.key").read_bytes(), user=name,
        )))
        return path

    def start(self, timeout: float = 120.0) -> None:
        started = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        _make_pki(self.pki)
        pki = self.pki
        self.kubeconfig.write_text(json.dumps(kubeconfig(
            f"https://{_HOST}:{API_PORT}", (pki / "ca.crt").read_bytes(), (pki / "admin.crt").read_bytes(),
            (pki / "admin.key").read_bytes())))
        os.chmod(self.kubeconfig, 0o600)
        self._start("etcd", [
            "etcd", "--name=devstack", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://{_HOST}:{ETCD_PORT}", f"--advertise-client-urls=http://{_HOST}:{ETCD_PORT}",
            f"--listen-peer-urls=http://{_HOST}:2380", f"--initial-advertise-peer-urls=http://{_HOST}:2380",
            f"--initial-cluster=devstack=http://{_HOST}:2380", "--unsafe-no-fsync", "--log-level=warn",
        ])
        self._start("kube-apiserver", [
            "kube-apiserver", f"--etcd-servers=http://{_HOST}:{ETCD_PORT}",
            # on loopback: no routable address to advertise, and no endpoint reconciling for it
            f"--advertise-address={_HOST}", f"--bind-address={_HOST}", f"--secure-port={API_PORT}",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'service-account.pub'}",
            f"--service-account-signing-key-file={pki / 'service-account.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
            "--profiling=false", "--enable-priority-and-fairness=false",
        ])
        self._wait_api(started + timeout)
        self._start("kube-controller-manager", [
            "kube-controller-manager", f"--kubeconfig={self._component_kubeconfig('controller-manager')}",
            f"--bind-address={_HOST}", "--secure-port=10257", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'service-account.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false",
            # each controller as its own service account, with its bootstrap role (as kubeadm runs it)
            "--use-service-account-credentials=true",
            # a fake node's pods are gone with it at once, not after five minutes
            "--node-monitor-grace-period=40s",
        ])
        self._start("kube-scheduler", [
            "kube-scheduler", f"--kubeconfig={self._component_kubeconfig('scheduler')}",
            f"--bind-address={_HOST}", "--secure-port=10259", "--leader-elect=false", "--profiling=false",
        ])
        self._start("kwok", [
            "kwok", f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-lease-duration-seconds=40", "--cidr=10.244.0.1/16", f"--node-ip={_HOST}",
            f"--server-address={_HOST}:10247",
            *(f"--config={self.stage_dir / stage}.yaml" for stage in KWOK_STAGES),
        ])
        for name, zone in NODES:
            self.api("POST", "/api/v1/nodes", _node(name, zone))
        self._wait(started + timeout, "the nodes Ready", self._nodes_ready, "kwok")
        # the controller manager's service-account controller has run: namespaces get `default`
        self._wait(started + timeout, "the default ServiceAccount",
                   lambda: self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default", ok404=True) is not None,
                   "kube-controller-manager")
        self._wait(started + timeout, "the scheduler", lambda: _https_ok(f"https://{_HOST}:10259/readyz"), "kube-scheduler")

    def _wait_api(self, deadline: float) -> None:
        def ready() -> bool:
            try:
                return bool(self.api("GET", "/readyz", raw=True) == "ok")
            except (OSError, DevstackError):
                return False

        self._wait(deadline, "the API server", ready, "kube-apiserver")

    def _wait(self, deadline: float, what: str, check: Any, log: str) -> None:
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise DevstackError(f"{name} exited ({proc.returncode}) before {what} was up:\n{self.log_tail(name)}")
            if check():
                return
            if time.monotonic() > deadline:
                raise DevstackError(f"timed out waiting for {what}:\n{self.log_tail(log)}")
            time.sleep(0.2)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _nodes_ready(self) -> bool:
        nodes = self.api("GET", "/api/v1/nodes")["items"]
        ready = [n for n in nodes
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))]
        return len(ready) == len(NODES)

    def api(self, method: str, path: str, body: Any = None, *, raw: bool = False, ok404: bool = False) -> Any:
        """One call to the API server as the admin (system:masters)."""
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"https://{_HOST}:{API_PORT}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self._ssl, timeout=10) as reply:
                text = reply.read().decode()
        except urllib.error.HTTPError as exc:
            if ok404 and exc.code == 404:
                return None
            raise DevstackError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from None
        return text if raw else json.loads(text)

    def stop(self) -> None:
        """SIGKILL every component (a graceful API server shutdown after etcd hangs for minutes)."""
        for proc in self._procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self._procs.values():
            proc.wait()
        self._procs.clear()


def _https_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


def _node(name: str, zone: str) -> dict[str, Any]:
    resources = {"cpu": "32", "memory": "128Gi", "pods": "110"}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "topology.kubernetes.io/zone": zone, "type": "kwok"},
        },
        "status": {"allocatable": resources, "capacity": resources},
    }


# --- python -m devstack k8s -- CMD ---------------------------------------------------------

def run(cmd: Sequence[str], *, keep: bool = False, log: TextIO = sys.stderr) -> int:
    """Build (once), enter a private network namespace, start the control plane, run ``cmd``
    there, tear it all down; ``cmd``'s exit status (128+N for a signal)."""
    if not cmd:
        raise DevstackError("no command: python -m devstack k8s -- CMD ARGS...")
    home = binaries()
    helm = helm_binary()
    if os.geteuid() != 0 and not os.environ.get("ZVT_K8S_IN_NETNS"):
        # without root: a user namespace that maps us to root there, then the same again
        unshare = shutil.which("unshare")
        if unshare is None:
            raise DevstackError("not root and no `unshare` (util-linux) to make a network namespace with")
        os.execvpe(unshare, [unshare, "--net", "--map-root-user", sys.executable, "-m", "devstack", "k8s",
                             *(["--keep"] if keep else []), "--", *cmd],
                   {**os.environ, "ZVT_K8S_IN_NETNS": "1"})
    enter_private_netns()
    workdir = Path(tempfile.mkdtemp(prefix="zvt-k8s-"))
    plane = ControlPlane(home / "bin", home / "stage", workdir)
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: Any) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    status = 1
    try:
        started = time.monotonic()
        plane.start()
        print(f"devstack: Kubernetes {K8S_VERSION} up in {time.monotonic() - started:.1f} s "
              f"({len(NODES)} kwok nodes; state and logs in {workdir})", file=log, flush=True)
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "ZVT_K8S_LOGS": str(plane.logs),
               "PATH": os.pathsep.join([str(helm.parent), str(home / "bin"), os.environ.get("PATH", "")])}
        env.pop("ZVT_K8S_IN_NETNS", None)
        try:
            child = subprocess.Popen(list(cmd), env=env)
        except OSError as exc:
            print(f"devstack: cannot run {cmd[0]}: {exc.strerror}", file=log)
            status = 127 if exc.errno == errno.ENOENT else 126
        else:
            code = child.wait()
            status = 128 - code if code < 0 else code
    except KeyboardInterrupt:
        status = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        plane.stop()
        if keep or status != 0:
            print(f"devstack: the control plane's state and logs stay in {workdir}", file=log)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status
