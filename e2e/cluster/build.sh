#!/usr/bin/env bash
# Builds what is missing into e2e/cluster/bin/: `controlplane` (etcd + kube-apiserver +
# kube-controller-manager + kube-scheduler from the Kubernetes Go modules, this folder's main.go) and
# the real `helm`, from its Go module. Each binary is skipped when its stamp (a hash of its sources,
# go.mod/go.sum, this script and the Go version) is unchanged. Go's own build and module caches
# (GOCACHE, GOMODCACHE: their defaults under $HOME) make a rebuild after a small change quick.
#
#   e2e/cluster/build.sh          # build what is missing or stale
#   e2e/cluster/build.sh helm     # only one of them (controlplane | helm)
#   FORCE=1 e2e/cluster/build.sh  # rebuild
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
bin="$here/bin"
mkdir -p "$bin"

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# The Go toolchain is the one on PATH; GOTOOLCHAIN=local keeps go.mod's `go` line from fetching another.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
go_version="$(go env GOVERSION)"

log() { echo "[e2e/cluster/build] $*" >&2; }

stamp_ok() {  # $1 binary, $2 expected stamp
  [ -z "${FORCE:-}" ] && [ -x "$1" ] && [ -f "$1.stamp" ] && [ "$(cat "$1.stamp")" = "$2" ]
}

started=$SECONDS
targets="${*:-controlplane helm}"
wanted() { case " $targets " in *" $1 "*) return 0;; *) return 1;; esac; }

# --- the control plane --------------------------------------------------------------------------
cp_stamp="$( { echo "$go_version"; cat go.mod go.sum build.sh; for f in $(ls ./*.go | LC_ALL=C sort); do echo "$f"; cat "$f"; done; } | sha256sum | cut -d' ' -f1)"
if ! wanted controlplane; then
  :
elif stamp_ok "$bin/controlplane" "$cp_stamp"; then
  log "controlplane up to date"
else
  t0=$SECONDS
  kube_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"   # e.g. v1.37.2
  kube_date="$(go list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
  major="${kube_version#v}"; major="${major%%.*}"
  minor="${kube_version#v*.}"; minor="${minor%%.*}"
  # As kubernetes' hack/lib/version.sh sets them, so /version, helm's kubeVersion checks and
  # kubectl's skew warnings see v1.37.x instead of v0.0.0-master.
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=${kube_date:-1970-01-01T00:00:00Z}"
  done
  log "building controlplane (k8s.io/kubernetes $kube_version, $go_version); a cold build takes tens of minutes on 2 cores"
  # (no -trimpath, and cgo as the machine has it: the same flags as a plain `go build`, so the build
  # cache is shared with developers' own builds of this folder)
  go build -ldflags "$ldflags" -o "$bin/controlplane.new" .
  mv "$bin/controlplane.new" "$bin/controlplane"
  echo "$cp_stamp" > "$bin/controlplane.stamp"
  log "controlplane built in $((SECONDS - t0)) s ($(du -h "$bin/controlplane" | cut -f1))"
fi

# --- helm -----------------------------------------------------------------------------------------
helm_stamp="$( { echo "$go_version $HELM_VERSION"; cat build.sh; } | sha256sum | cut -d' ' -f1)"
if ! wanted helm; then
  :
elif stamp_ok "$bin/helm" "$helm_stamp"; then
  log "helm $HELM_VERSION up to date"
else
  t0=$SECONDS
  # Helm's Makefile: version, metadata and tree state, plus the Kubernetes version its lint and
  # capabilities default to, taken from the client-go it builds with (v0.37 -> 1.37).
  helm_dir="$(mktemp -d)"
  trap 'rm -rf "$helm_dir"' EXIT
  # (asked from an empty folder, outside this module, so go.mod and go.sum stay as they are)
  helm_src="$(cd "$helm_dir" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  client_go="$(sed -n 's/^\s*k8s.io\/client-go v\([0-9.]*\).*/\1/p' "$helm_src/go.mod" | head -n1)"   # e.g. 0.37.0
  k8s_major=$(( ${client_go%%.*} + 1 ))
  k8s_minor="${client_go#*.}"; k8s_minor="${k8s_minor%%.*}"
  hl="-w -s -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  hl+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    hl+=" -X $pkg.k8sVersionMajor=$k8s_major -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  log "building helm $HELM_VERSION"
  GOBIN="$helm_dir/bin" CGO_ENABLED=0 go install -trimpath -ldflags "$hl" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$helm_dir/bin/helm" "$bin/helm"
  echo "$helm_stamp" > "$bin/helm.stamp"
  log "helm built in $((SECONDS - t0)) s ($(du -h "$bin/helm" | cut -f1))"
fi

log "done in $((SECONDS - started)) s"
