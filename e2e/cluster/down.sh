#!/usr/bin/env bash
# Stops what e2e/cluster/up.sh started: the process kubelet first (its Pods' processes end with it),
# then the control plane (SIGTERM: scheduler and controllers, apiserver, etcd, cleanly). The state
# (certificates, etcd data) stays for the next up.sh unless --purge is given.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${KOMPRESSOR_CLUSTER_STATE:-$here/state}"

log() { echo "[e2e/cluster/down] $*" >&2; }

stop() {  # stop PIDFILE WHAT GRACE
  local pidfile="$1" what="$2" grace="$3" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$what (pid $pid) still running after ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    else
      log "$what stopped"
    fi
  fi
  rm -f "$pidfile"
}

stop "$state/kubelet.pid" "process kubelet" 30
stop "$state/controlplane.pid" "control plane" 60
rm -f "$state/controlplane/ready" "$state/kubelet/ready"
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$state"
  log "removed $state"
fi
