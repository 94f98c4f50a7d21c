#!/usr/bin/env bash
# Builds a Kubernetes control plane from Go modules at pinned releases into a cache outside the
# work tree (~/.cache/zvt-fleet/k8s/ unless ZVT_K8S_CACHE says otherwise), once; later runs
# reuse it, from any clone. Nothing built from these sources is committed. Prints the folder
# holding the binaries and kwok's stage files.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl   k8s.io/kubernetes
#   etcd                                                               go.etcd.io/etcd/server/v3
#   kwok (simulated nodes and pods, no container runtime)              sigs.k8s.io/kwok
#
# k8s.io/kubernetes is not meant to be required as a module: its go.mod requires its staging
# modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and replaces them with ./staging
# folders, and replacements in a dependency are ignored. So a wrapper module requires it and
# replaces each staging module with its published k8s.io/* release of the same minor.
# The version is linked in (component-base and client-go): charts check kubeVersion.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.7.3}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
CACHE="${ZVT_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zvt-fleet/k8s}"
DEST="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

have_all() {
    local b
    for b in "${K8S_BINARIES[@]}" etcd kwok; do [ -x "$DEST/bin/$b" ] || return 1; done
    [ -f "$DEST/stage/node-initialize.yaml" ] || return 1
    # whole outputs compared, not piped into `grep -q`: with pipefail, grep's early exit can
    # fail the writer with SIGPIPE and so the check, now and then
    [ "$("$DEST/bin/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $K8S_VERSION" ] || return 1
    local etcd
    etcd="$("$DEST/bin/etcd" --version 2>/dev/null)" || return 1
    [ "${etcd%%$'\n'*}" = "etcd Version: ${ETCD_VERSION#v}" ]
}

if have_all; then
    echo "$DEST"
    exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build-k8s: go is not installed" >&2; exit 1; }
started=$(date +%s)
echo "build-k8s: building Kubernetes $K8S_VERSION, etcd $ETCD_VERSION and kwok $KWOK_VERSION into $DEST;" \
    "this takes about 15 minutes once (2 cores, cold Go caches)" >&2
work="$DEST.tmp"
rm -rf "$work"
mkdir -p "$work/bin" "$work/stage" "$work/mod-k8s" "$work/mod-etcd"

moddir() {  # the folder of a downloaded module version
    go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

# --- Kubernetes: the wrapper module --------------------------------------------------------
k8s_src="$(moddir "k8s.io/kubernetes@$K8S_VERSION")"
[ -n "$k8s_src" ] && [ -f "$k8s_src/go.mod" ] || { echo "build-k8s: could not download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
staging_version="v0.${K8S_VERSION#v1.}"
go_line="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$k8s_src/go.mod" | head -1)"
{
    echo "module zvt.local/k8s-control-plane"
    echo
    echo "go ${go_line:-1.25}"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    for b in "${K8S_BINARIES[@]}"; do echo "tool k8s.io/kubernetes/cmd/$b"; done
    echo
    # each `k8s.io/x => ./staging/src/k8s.io/x` of Kubernetes' own go.mod, published instead;
    # the two samples are not published and nothing here needs them
    sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/k8s\.io/[a-z0-9-]*$#\1#p' "$k8s_src/go.mod" |
        grep -vx 'k8s.io/sample-cli-plugin\|k8s.io/sample-controller' |
        sed "s#.*#replace & => & $staging_version#"
} >"$work/mod-k8s/go.mod"
grep -q '^replace k8s.io/api ' "$work/mod-k8s/go.mod" || { echo "build-k8s: found no staging modules in k8s.io/kubernetes@$K8S_VERSION's go.mod" >&2; exit 1; }
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
(
    cd "$work/mod-k8s"
    go mod tidy
    packages=()
    for b in "${K8S_BINARIES[@]}"; do packages+=("k8s.io/kubernetes/cmd/$b"); done
    GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0 go build -ldflags="$ldflags" -o "$work/bin/" "${packages[@]}"
)
echo "build-k8s: Kubernetes built after $(( $(date +%s) - started )) s" >&2

# --- etcd: a one-line wrapper module ----------------------------------------------------------
printf 'module zvt.local/etcd\n\ngo 1.25\n\nrequire go.etcd.io/etcd/server/v3 %s\n\ntool go.etcd.io/etcd/server/v3\n' \
    "$ETCD_VERSION" >"$work/mod-etcd/go.mod"
(
    cd "$work/mod-etcd"
    go mod tidy
    GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0 go build -ldflags="-s -w" -o "$work/bin/etcd" go.etcd.io/etcd/server/v3
)
echo "build-k8s: etcd built after $(( $(date +%s) - started )) s" >&2

# --- kwok: from inside its module, with its own go.mod and go.sum; plus its stage files -------
kwok_src="$(moddir "sigs.k8s.io/kwok@$KWOK_VERSION")"
[ -n "$kwok_src" ] && [ -f "$kwok_src/go.mod" ] || { echo "build-k8s: could not download sigs.k8s.io/kwok@$KWOK_VERSION" >&2; exit 1; }
(cd "$kwok_src" && GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0 \
    go build -ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" -o "$work/bin/kwok" ./cmd/kwok)
# node initialize, node heartbeat with lease, pod ready / complete / delete
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    cp "$kwok_src/kustomize/stage/$f" "$work/stage/" ||
        { echo "build-k8s: kwok $KWOK_VERSION has no kustomize/stage/$f" >&2; exit 1; }
done
chmod -R u+w "$work/stage"
echo "build-k8s: kwok built after $(( $(date +%s) - started )) s" >&2

rm -rf "$DEST"
mv "$work" "$DEST"
echo "build-k8s: built in $(( $(date +%s) - started )) s" >&2
have_all || { echo "build-k8s: $DEST does not hold the expected binaries and versions" >&2; exit 1; }
echo "$DEST"
