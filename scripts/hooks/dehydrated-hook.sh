#!/usr/bin/env bash
# dehydrated's HOOK for HTTP-01 through le-redirect: the tokens are served from the session's memory,
# and port 80 is steered only while at least one is registered.
#
#   HOOK=/usr/local/share/le-redirect/hooks/dehydrated-hook.sh   (in dehydrated's config)
#
# deploy_challenge begins an --in-memory session if none is active (le-redirect's begin options can
# be given in LE_REDIRECT_BEGIN_OPTIONS, e.g. "--ttl 5m") and registers the token; clean_challenge
# removes it, and the session ends with its last token (or when dehydrated exits, whichever comes
# first). Both take one DOMAIN TOKEN_FILENAME
# TOKEN_VALUE triple, or several with HOOK_CHAIN=yes. Every other event is left alone.
set -euo pipefail
# Where scripts/install puts le-redirect, for runners (cron) whose PATH lacks it.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

deploy_challenge() {
    while [ $# -ge 3 ]; do
        # shellcheck disable=SC2086 # the options are words on purpose
        le-redirect challenge add --begin --until-parent-exits --unknown-challenges app ${LE_REDIRECT_BEGIN_OPTIONS:-} -- "$2" "$3"
        shift 3
    done
}

clean_challenge() {
    while [ $# -ge 3 ]; do
        le-redirect challenge remove -- "$2"
        shift 3
    done
}

handler="${1:-}"
[ $# -gt 0 ] && shift
case "$handler" in
    deploy_challenge) deploy_challenge "$@" ;;
    clean_challenge) clean_challenge "$@" ;;
    *) ;;
esac
