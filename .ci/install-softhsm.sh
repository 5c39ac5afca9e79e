#!/usr/bin/env bash
# Install Debian's SoftHSM2 for the PKCS#11 key manager tests (tests/integration/test_pkcs11.py).
# The tests make their own token in a temp directory (SOFTHSM2_CONF), so the system token
# directory is never used. Idempotent and quiet; CI runs as root.
set -euo pipefail

have_softhsm() {
    command -v softhsm2-util >/dev/null || return 1
    compgen -G "/usr/lib/softhsm/libsofthsm2.so" >/dev/null \
        || compgen -G "/usr/lib/*/softhsm/libsofthsm2.so" >/dev/null
}

# Already there: skip apt entirely, which keeps repeated CI runs fast.
have_softhsm && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq softhsm2 >/dev/null </dev/null

have_softhsm || {
    echo "install-softhsm: softhsm2-util/libsofthsm2.so not found after installing softhsm2" >&2
    exit 1
}
