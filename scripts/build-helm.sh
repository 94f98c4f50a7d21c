#!/usr/bin/env bash
# Builds the real helm CLI from its Go module (helm.sh/helm/v3) at a pinned release into a
# cache outside the work tree (~/.cache/zvt-fleet/tools/ unless HELM_BIN_DIR says otherwise),
# once; later runs reuse it, from any clone. Nothing built from Helm's source is committed.
# Prints the path of the helm binary.
#
# The release's ldflags are linked in, as Helm's own Makefile does: the version
# (-X .../internal/version.version) so `helm version` reports it, and the Kubernetes version of
# its client-go modules (chartutil and lint/rules k8sVersionMajor/Minor) so `helm template` and
# `helm lint` check the chart's kubeVersion against a current release without --kube-version
# (a plain `go install` leaves Helm's placeholder, v1.20).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${HELM_VERSION:-v3.22.0}"
DEST="${HELM_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zvt-fleet/tools/helm-$VERSION}"
BIN="$DEST/helm"

have_it() {
    [ -x "$BIN" ] && [ "$("$BIN" version --template '{{.Version}}' 2>/dev/null)" = "$VERSION" ] &&
        grep -q 'chartutil.k8sVersionMinor=' "$DEST/LDFLAGS" 2>/dev/null
}

if have_it; then
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build-helm: go is not installed" >&2; exit 1; }
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
started=$(date +%s)
echo "build-helm: building helm $VERSION into $DEST; this takes a few minutes once" >&2
# Download the pinned module and build from inside it, with its own go.mod and go.sum (a bare
# `go install module@version` also asks the proxy for the version list, which it may refuse).
src="$(go mod download -json "helm.sh/helm/v3@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[ -n "$src" ] && [ -f "$src/go.mod" ] || { echo "build-helm: could not download helm.sh/helm/v3@$VERSION" >&2; exit 1; }
# Kubernetes version of the client-go Helm is built with, as its Makefile derives it
# (client-go v0.X.Y is Kubernetes 1.X)
client_go="$(cd "$src" && GOFLAGS=-mod=readonly go list -m -f '{{.Version}}' k8s.io/client-go)"
k8s_minor="$(echo "$client_go" | cut -d. -f2)"
[ -n "$k8s_minor" ] || { echo "build-helm: could not read the k8s.io/client-go version of helm $VERSION" >&2; exit 1; }
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done
(cd "$src" && GOBIN="$DEST.tmp" GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0 \
    go install -ldflags="$ldflags" ./cmd/helm)
echo "$ldflags" >"$DEST.tmp/LDFLAGS"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "build-helm: built in $(( $(date +%s) - started )) s" >&2
have_it || { echo "build-helm: $BIN does not report $VERSION" >&2; exit 1; }
echo "$BIN"
