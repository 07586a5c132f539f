#!/usr/bin/env bash
# acmetool's hook for HTTP-01 through le-redirect: install it (executable, not world-writable) in
# acmetool's hooks directory (/usr/lib/acme/hooks or /etc/acme/hooks, or --hooks DIR). The tokens
# are served from the session's memory, and port 80 is steered only while at least one is
# registered.
#
# acmetool runs every executable there for each event: `challenge-http-start HOST FILE TOKEN` with
# the key authorization on stdin registers TOKEN, beginning an --in-memory session if none is
# active, with --include-local: acmetool fetches each challenge from http://HOST/ itself before
# asking the CA (its self-test), from this host, and that fetch must reach the proxy too. (begin's
# options can be given in LE_REDIRECT_BEGIN_OPTIONS.) `challenge-http-stop HOST FILE TOKEN` removes
# it; the session ends with its last token, or when acmetool exits, whichever comes first. Exit 42
# says "not handled" for every other event, as acmetool's hook protocol asks.
set -euo pipefail
# Where scripts/install puts le-redirect, for runners (cron, systemd) whose PATH lacks it.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

event=${1:-}
case "$event" in
    challenge-http-start)
        [ $# -eq 4 ] || { echo "acmetool-hook.sh: expected challenge-http-start HOST FILE TOKEN, got $# arguments" >&2; exit 2; }
        token=$4
        auth=$(head -c 1024)
        # shellcheck disable=SC2086 # the options are words on purpose
        exec le-redirect challenge add --begin --until-parent-exits --include-local --unknown-challenges app \
            ${LE_REDIRECT_BEGIN_OPTIONS:-} -- "$token" "$auth" ;;
    challenge-http-stop)
        [ $# -eq 4 ] || { echo "acmetool-hook.sh: expected challenge-http-stop HOST FILE TOKEN, got $# arguments" >&2; exit 2; }
        exec le-redirect challenge remove -- "$4" ;;
    *)
        exit 42 ;;
esac
