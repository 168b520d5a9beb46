#!/usr/bin/env bash
# Installs Debian's mariadb-server when mariadbd is missing, so `make test` can start the
# private MariaDB server the suite runs on (tests/support/mariadb.py). Nothing is started
# or enabled here: the suite starts its own server on a data directory of its own.
set -euo pipefail
if command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || [ -n "${CASTY_SA_TEST_MYSQL_URL:-}" ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "the suite needs Debian's mariadb-server (run as root: apt-get install mariadb-server)," \
         "or CASTY_SA_TEST_MYSQL_URL set to a MySQL/MariaDB server" >&2
    exit 1
fi
echo "installing mariadb-server (the suite's MariaDB)..."
"${as_root[@]}" apt-get update -qq
# policy-rc.d-less machines would start Debian's own service: the suite never uses it
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
    mariadb-server >/dev/null
