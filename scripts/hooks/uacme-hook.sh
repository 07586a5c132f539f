#!/usr/bin/env bash
# uacme's hook (-h) for HTTP-01 through le-redirect: the tokens are served from the session's memory,
# and port 80 is steered only while at least one is registered.
#
#   uacme -h /usr/local/share/le-redirect/hooks/uacme-hook.sh issue example.com
#
# uacme calls it as `METHOD TYPE IDENT TOKEN AUTH`: METHOD begin registers TOKEN with AUTH (its key
# authorization), beginning an --in-memory session if none is active (begin's options can be given
# in LE_REDIRECT_BEGIN_OPTIONS, e.g. "--ttl 5m"); done and failed remove it, and the session ends
# with its last token (or when uacme exits, whichever comes first). A non-zero exit on begin
# declines the challenge: uacme then tries the identifier's next one (dns-01, tls-alpn-01), which
# this hook always declines.
set -euo pipefail
# Where scripts/install puts le-redirect, for runners (cron) whose PATH lacks it.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

[ $# -eq 5 ] || { echo "uacme-hook.sh: expected METHOD TYPE IDENT TOKEN AUTH, got $# arguments" >&2; exit 2; }
method=$1 type=$2 token=$4 auth=$5
[ "$type" = "http-01" ] || exit 1
case "$method" in
    begin)
        # shellcheck disable=SC2086 # the options are words on purpose
        exec le-redirect challenge add --begin --until-parent-exits --unknown-challenges app ${LE_REDIRECT_BEGIN_OPTIONS:-} -- "$token" "$auth" ;;
    done | failed)
        exec le-redirect challenge remove -- "$token" ;;
    *)
        echo "uacme-hook.sh: unknown method $method" >&2
        exit 1 ;;
esac
