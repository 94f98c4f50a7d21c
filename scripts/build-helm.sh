#!/usr/bin/env bash
# Builds the real helm CLI from its Go module (helm.sh/helm/v3) at a pinned release into a
# git-ignored cache folder, once; later runs reuse it. Nothing built from Helm's source is
# committed. Prints the path of the helm binary.
#
# The version is linked in (-X .../internal/version.version) so `helm version` reports it and
# the chart's kubeVersion/apiVersion checks see a real release.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${HELM_VERSION:-v3.22.0}"
DEST="${HELM_BIN_DIR:-$ROOT/.cache/tools/helm-$VERSION}"
BIN="$DEST/helm"

have_it() {
    [ -x "$BIN" ] && "$BIN" version --template '{{.Version}}' 2>/dev/null | grep -qx "$VERSION"
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
(cd "$src" && GOBIN="$DEST.tmp" GOFLAGS="-trimpath -mod=readonly" CGO_ENABLED=0 \
    go install -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION" ./cmd/helm)
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "build-helm: built in $(( $(date +%s) - started )) s" >&2
have_it || { echo "build-helm: $BIN does not report $VERSION" >&2; exit 1; }
echo "$BIN"
