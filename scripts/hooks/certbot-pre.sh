#!/usr/bin/env bash
# certbot pre-hook: take over port 80 for `certbot --standalone --http-01-port 12348`, until the
# post-hook gives it back, or until certbot exits (--until-parent-exits: a killed certbot does not
# leave the steering up until the TTL).
#   certbot certonly --standalone --http-01-port 12348 --http-01-address 127.0.0.1 --pre-hook PATH/certbot-pre.sh --post-hook PATH/certbot-post.sh
# or installed as /etc/letsencrypt/renewal-hooks/pre/le-redirect for `certbot renew`
# (scripts/install does that). le-redirect's begin options can be given in
# LE_REDIRECT_BEGIN_OPTIONS (e.g. "--ttl 5m --challenge-port 12348"). A challenge of a certificate
# renewed another way in the same `certbot renew` (--webroot, --nginx: nothing listens on 12348 then)
# is relayed to the app, as without le-redirect (--unknown-challenges app; "404" in the options
# overrides it).
set -euo pipefail
# Where scripts/install puts le-redirect, for runners (cron) whose PATH lacks it.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
# shellcheck disable=SC2086 # the options are words on purpose
exec le-redirect begin --until-parent-exits --unknown-challenges app ${LE_REDIRECT_BEGIN_OPTIONS:-}
