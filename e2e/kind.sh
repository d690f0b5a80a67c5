#!/usr/bin/env bash
# The end-to-end scenario on a real Kubernetes cluster (kind):
#   1. creates the kind cluster $KIND_CLUSTER (default kompressor-e2e) unless it exists,
#   2. builds the operator and jobs images from operator/Dockerfile and jobs/Dockerfile and loads
#      them into the cluster (tags = the chart's defaults, so no registry is involved),
#   3. installs charts/kompressor with Helm into $KOMPRESSOR_E2E_NAMESPACE (default kompressor),
#   4. runs e2e/ with KOMPRESSOR_E2E_TARGET=cluster (the CompressedModel goes into that namespace,
#      where the chart's artifacts PersistentVolumeClaim lives),
#   5. deletes the cluster again if this script created it (KEEP_CLUSTER=1 keeps it).
# Needs: kind, docker, kubectl, helm, and a Python environment with `pip install -e '.[jobs,test]'`.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-kompressor-e2e}
NAMESPACE=${KOMPRESSOR_E2E_NAMESPACE:-kompressor}
PYTHON=${PYTHON:-python3}
VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
OPERATOR_IMAGE=ghcr.io/kompressor/kompressor-operator:$VERSION
JOBS_IMAGE=ghcr.io/kompressor/kompressor-jobs:$VERSION

for tool in kind docker kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e/kind.sh: '$tool' is not on PATH" >&2; exit 2; }
done

created=0
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 180s
  created=1
fi
cleanup() {
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER"
  fi
}
trap cleanup EXIT

KUBECONFIG="$(mktemp -d)/kubeconfig"
export KUBECONFIG
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"

docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f jobs/Dockerfile -t "$JOBS_IMAGE" .
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$JOBS_IMAGE"

helm upgrade --install kompressor charts/kompressor --namespace "$NAMESPACE" --create-namespace \
  --wait --timeout 10m

KOMPRESSOR_E2E_TARGET=cluster KOMPRESSOR_E2E_NAMESPACE="$NAMESPACE" KOMPRESSOR_E2E_TIMEOUT_SCALE=${KOMPRESSOR_E2E_TIMEOUT_SCALE:-3} \
  "$PYTHON" -m pytest e2e -v -rs "$@"
