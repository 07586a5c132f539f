#!/usr/bin/env bash
# certbot post-hook: give port 80 back (exits 0 when nothing is active: certbot runs post-hooks after
# a failed pre-hook too). Installed as /etc/letsencrypt/renewal-hooks/post/le-redirect by scripts/install.
set -euo pipefail
# Where scripts/install puts le-redirect, for runners (cron) whose PATH lacks it.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
exec le-redirect end
