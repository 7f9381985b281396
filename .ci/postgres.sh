#!/usr/bin/env bash
# A throw-away PostgreSQL server on loopback, for the multi-worker tests (and for trying
# `autotune search --storage postgresql://...` locally):
#   eval "$(bash .ci/postgres.sh start /tmp/pg)"   # prints: export AUTOTUNE_TEST_POSTGRES_URL=...
#   bash .ci/postgres.sh stop /tmp/pg
# Installs Debian's postgresql where initdb is missing (as root). initdb refuses to run as root,
# so the server then runs as the postgres user. Trust authentication, 127.0.0.1 only.
set -euo pipefail
action=${1:?usage: postgres.sh start|stop DIR}
dir=${2:?usage: postgres.sh start|stop DIR}

bindir() {
    local found
    found=$(command -v pg_ctl 2>/dev/null || true)
    if [ -z "$found" ]; then
        found=$(ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1 || true)
    fi
    if [ -z "$found" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get install -y -qq postgresql >/dev/null 2>&1 \
            || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1)) >&2 || true
        found=$(ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1 || true)
    fi
    [ -n "$found" ] || { echo "postgres.sh: no PostgreSQL server (pg_ctl) found or installable" >&2; exit 1; }
    dirname "$(readlink -f "$found")"
}

as_owner() {  # run as the data folder's owner: postgres when we are root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$action" in
start)
    bin=$(bindir)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -h 127.0.0.1 -c max_connections=200 -c fsync=off" start >/dev/null
    echo "export AUTOTUNE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    bin=$(bindir)
    [ -d "$dir/data" ] && as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: postgres.sh start|stop DIR" >&2; exit 2 ;;
esac
