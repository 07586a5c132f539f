#!/usr/bin/env bash
# For comparison in scripts/bench-renewal only, not part of le-redirect: the source approach (docs/design.md)
# as a certbot pre-hook. tinyproxy on 12347 configured as the hosting platform's add-on configures
# it, and the six rules its nft branch inserts, one `nft` call each. It needs ip/ip6 filter INPUT and
# ip/ip6 nat PREROUTING to exist (it fails outright otherwise); the bench makes the nat ones for it.
set -u
PROXY_PORT=12347 LE_PORT=12348
STATE=${SOURCE_APPROACH_STATE:?}
mkdir -p "$STATE"
date +%s.%N > "$STATE/begin"
cat > "$STATE/tinyproxy.conf" <<CONF
User tinyproxy
Group tinyproxy
Port ${PROXY_PORT}
Timeout 6000
MaxClients 100
MinSpareServers 5
MaxSpareServers 20
StartServers 10
MaxRequestsPerChild 0
BindSame yes
DisableViaHeader Yes
ConnectPort 80
ConnectPort ${LE_PORT}
AddHeader "X-Forwarded-Proto" "http"
ReversePath "/" "http://127.0.0.1/"
ReversePath "/.well-known/acme-challenge/" "http://127.0.0.1:${LE_PORT}/.well-known/acme-challenge/"
ReverseOnly Yes
ReverseMagic Yes
PidFile "$STATE/tinyproxy.pid"
LogFile "$STATE/tinyproxy.log"
CONF
setsid tinyproxy -d -c "$STATE/tinyproxy.conf" >/dev/null 2>&1 < /dev/null &
echo $! > "$STATE/tinyproxy.run"
sleep 0.2
nft insert rule ip filter INPUT tcp dport ${PROXY_PORT} counter accept comment \"LE\"
nft insert rule ip filter INPUT tcp dport ${LE_PORT} counter accept comment \"LE\"
nft insert rule ip6 filter INPUT tcp dport ${LE_PORT} counter accept comment \"LE\"
nft insert rule ip6 filter INPUT tcp dport ${PROXY_PORT} counter accept comment \"LE\"
nft insert rule ip nat PREROUTING ip saddr != 127.0.0.1 tcp dport 80 counter redirect to ${PROXY_PORT} comment \"LE\"
nft insert rule ip6 nat PREROUTING ip6 saddr != ::1 tcp dport 80 counter redirect to ${LE_PORT} comment \"LE\" || \
    nft insert rule ip6 filter INPUT tcp dport 80 counter drop comment \"LE\"
