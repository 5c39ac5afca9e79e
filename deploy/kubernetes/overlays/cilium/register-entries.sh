#!/bin/sh
# Keeps in place the registration entries Cilium's own SPIRE install creates, so Cilium's
# mutual authentication works against meshid unchanged:
#   1. node alias for every meshid agent of this cluster (parent: the meshid server),
#   2. cilium-agent     (k8s:ns:<cilium ns>, k8s:sa:cilium)          -> authorized delegate,
#   3. cilium-operator  (k8s:ns:<cilium ns>, k8s:sa:cilium-operator) -> server admin ID.
# Runs as a sidecar of the server (shares its admin socket) and re-checks every 30 s, so
# an entry deleted by mistake comes back. Equivalent one-off commands are in
# docs/kubernetes.md.
set -u

TD="${TRUST_DOMAIN:-spiffe.cilium}"
CLUSTER="${CLUSTER_NAME:-meshid-cluster}"
AGENT_NS="${MESHID_NAMESPACE:-meshid}"
CILIUM_NS="${CILIUM_NAMESPACE:-kube-system}"
CILIUM_AGENT_SA="${CILIUM_AGENT_SERVICE_ACCOUNT:-cilium}"
CILIUM_OPERATOR_SA="${CILIUM_OPERATOR_SERVICE_ACCOUNT:-cilium-operator}"

SERVER_ID="spiffe://${TD}/meshid/server"
NODE_ID="spiffe://${TD}/ns/${AGENT_NS}/sa/meshid-agent"
CILIUM_AGENT_ID="spiffe://${TD}/cilium-agent"
CILIUM_OPERATOR_ID="spiffe://${TD}/cilium-operator"

# ensure <spiffe-id> <parent-id> <selector>...: create the entry unless one exists.
ensure() {
  id="$1"
  parent="$2"
  shift 2
  if meshid entry list --spiffe-id "$id" --parent-id "$parent" 2>/dev/null \
      | grep -q "\"spiffe_id\": \"$id\""; then
    return 0
  fi
  for selector in "$@"; do
    set -- "$@" --selector "$selector"
    shift
  done
  if meshid entry create --spiffe-id "$id" --parent-id "$parent" "$@" >/dev/null; then
    echo "created entry $id"
  else
    echo "could not create entry $id (server not ready yet?)" >&2
  fi
}

while :; do
  ensure "$NODE_ID" "$SERVER_ID" \
    "k8s_psat:cluster:${CLUSTER}" "k8s_psat:agent_ns:${AGENT_NS}" "k8s_psat:agent_sa:meshid-agent"
  ensure "$CILIUM_AGENT_ID" "$NODE_ID" "k8s:ns:${CILIUM_NS}" "k8s:sa:${CILIUM_AGENT_SA}"
  ensure "$CILIUM_OPERATOR_ID" "$NODE_ID" "k8s:ns:${CILIUM_NS}" "k8s:sa:${CILIUM_OPERATOR_SA}"
  sleep 30
done
