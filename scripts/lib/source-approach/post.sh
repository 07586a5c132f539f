#!/usr/bin/env bash
# For comparison in scripts/bench-renewal only: the source approach's removal, by listing each chain
# with handles and deleting every "LE" rule, then stopping tinyproxy (connections in flight or not).
set -u
STATE=${SOURCE_APPROACH_STATE:?}
# The redirects' counters (packets: each connection's first), for the bench, before they go.
nft list chain ip nat PREROUTING > "$STATE/counters" 2>/dev/null
nft list chain ip6 nat PREROUTING >> "$STATE/counters" 2>/dev/null
for chain in "ip filter INPUT" "ip6 filter INPUT" "ip nat PREROUTING" "ip6 nat PREROUTING"; do
    # shellcheck disable=SC2086 # family, table and chain are words on purpose
    nft -a list chain $chain 2>/dev/null | grep 'comment "LE"' | sed -E 's/.*# handle ([0-9]+).*/\1/' | while read -r handle; do
        nft delete rule $chain handle "$handle"
    done
done
[ -f "$STATE/tinyproxy.run" ] && kill "$(cat "$STATE/tinyproxy.run")" 2>/dev/null
date +%s.%N > "$STATE/end"
exit 0
