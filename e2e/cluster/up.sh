#!/usr/bin/env bash
# Starts a real local Kubernetes cluster in the background, for anyone who wants to try the operator
# without one: builds what is missing (e2e/cluster/build.sh), starts the control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler: bin/controlplane) and the process kubelet
# (kubelet.py: a CPU Node and a GPU Node whose Pods run as local processes), waits until both are
# ready, and prints the admin kubeconfig's path as its LAST line:
#
#   export KUBECONFIG="$(e2e/cluster/up.sh | tail -n1)"
#   kubectl get nodes
#   e2e/cluster/down.sh               # stop it (down.sh --purge also deletes its state)
#
# Everything it keeps is under $KOMPRESSOR_CLUSTER_STATE (default e2e/cluster/state/, git-ignored):
# controlplane/ (certificates, etcd data, kubeconfigs, the ready file), kubelet/ (Pod folders and
# logs), *.log and *.pid. Running it again while the cluster is up just prints the kubeconfig.
#
# Settings: KUBELET=0 starts no kubelet (no Nodes: Pods stay Pending); KOMPRESSOR_CLUSTER_NODES
# (default kompressor-cpu,kompressor-gpu); UP_TIMEOUT seconds (default 300).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${KOMPRESSOR_CLUSTER_STATE:-$here/state}"
nodes="${KOMPRESSOR_CLUSTER_NODES:-kompressor-cpu,kompressor-gpu}"
timeout="${UP_TIMEOUT:-300}"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

log() { echo "[e2e/cluster/up] $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for FILE PIDFILE WHAT LOG: until FILE exists, while the process lives, at most $timeout s.
wait_for() {
  local deadline=$((SECONDS + timeout))
  until [ -s "$1" ]; do
    if ! alive "$2"; then
      log "$3 exited before it was ready; the end of $4:"; tail -n 40 "$4" >&2; exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$3 not ready after ${timeout}s; the end of $4:"; tail -n 40 "$4" >&2; exit 1
    fi
    sleep 0.2
  done
}

"$here/build.sh" >&2
mkdir -p "$state"

# --- the control plane ------------------------------------------------------------------------
cp_dir="$state/controlplane"
if alive "$state/controlplane.pid" && [ -s "$cp_dir/ready" ]; then
  log "control plane already running (pid $(cat "$state/controlplane.pid"))"
else
  mkdir -p "$cp_dir"
  rm -f "$cp_dir/ready"
  log "starting the control plane (log: $state/controlplane.log)"
  t0=$SECONDS
  nohup setsid "$here/bin/controlplane" --data-dir "$cp_dir" --nodes "$nodes" \
    >>"$state/controlplane.log" 2>&1 </dev/null &
  echo $! > "$state/controlplane.pid"
  wait_for "$cp_dir/ready" "$state/controlplane.pid" "the control plane" "$state/controlplane.log"
  log "control plane ready in $((SECONDS - t0)) s"
fi
kubeconfig="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["kubeconfig"])' "$cp_dir/ready")"

# --- the process kubelet (e2e/cluster/kubelet.py) -----------------------------------------------
# Hook: how the kubelet is started. It gets the admin kubeconfig (to provision volumes), one
# system:node kubeconfig per Node (the Node authorizer and NodeRestriction apply to its Node calls)
# and writes its own ready file once its Nodes are registered.
start_kubelet() {
  local kdir="$state/kubelet" cpu="${nodes%%,*}" gpu=""
  case "$nodes" in *,*) gpu="${nodes#*,}"; gpu="${gpu%%,*}";; esac
  local argv=("$python" "$here/kubelet.py" --kubeconfig "$kubeconfig" --state-dir "$kdir"
              --ready-file "$kdir/ready" --cpu-node "$cpu" --gpu-node "$gpu" --pod-env OMP_NUM_THREADS=1)
  local node
  for node in ${nodes//,/ }; do
    [ -f "$cp_dir/nodes/$node.kubeconfig" ] && argv+=(--node-kubeconfig "$node=$cp_dir/nodes/$node.kubeconfig")
  done
  mkdir -p "$kdir"
  rm -f "$kdir/ready"
  log "starting the process kubelet (log: $state/kubelet.log)"
  nohup setsid "${argv[@]}" >>"$state/kubelet.log" 2>&1 </dev/null &
  echo $! > "$state/kubelet.pid"
  wait_for "$kdir/ready" "$state/kubelet.pid" "the process kubelet" "$state/kubelet.log"
  log "process kubelet ready: nodes $nodes"
}
if [ "${KUBELET:-1}" != 0 ]; then
  if alive "$state/kubelet.pid" && [ -s "$state/kubelet/ready" ]; then
    log "process kubelet already running (pid $(cat "$state/kubelet.pid"))"
  elif [ -f "$here/kubelet.py" ]; then
    start_kubelet
  else
    log "no e2e/cluster/kubelet.py: no Nodes, Pods stay Pending"
  fi
fi

echo "$kubeconfig"
