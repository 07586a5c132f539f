#!/usr/bin/env bash
# certbot post-hook: give port 80 back (exits 0 when nothing is active: certbot runs post-hooks after
# a failed pre-hook too). Installed as /etc/letsencrypt/renewal-hooks/post/le-redirect by scripts/install.
set -euo pipefail
exec le-redirect end
