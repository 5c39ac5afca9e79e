#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for the datastore tests.
# The tests start their own throw-away cluster (tests/pg.py), so Debian's default
# cluster is never used. Idempotent and quiet; CI runs as root.
set -euo pipefail

have_binaries() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
        && compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}

# Already there: skip apt entirely, which keeps repeated CI runs fast.
have_binaries && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq postgresql >/dev/null </dev/null

have_binaries || {
    echo "install-postgres: initdb/pg_ctl not found after installing postgresql" >&2
    exit 1
}
