# Shared by the scripts: root check, Debian packages, the Swift toolchain.

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" = 0 ] || die "run as root: it creates network namespaces and changes their firewalls"
}

# apt_install PKG...: installs the Debian packages that are missing (updating the lists once if needed).
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# The packages every script needs to build and to test in namespaces.
BUILD_PACKAGES=(pkg-config libnftnl-dev libmnl-dev libiptc-dev libseccomp-dev)
TEST_PACKAGES=(nftables iptables conntrack iproute2 python3 util-linux procps nginx-light wrk haproxy)
# The testbed's and the renewal suite's: the CA, the ACME clients, and what the testbed runs.
RENEWAL_PACKAGES=(pebble certbot lego dehydrated uacme acme-tiny acmetool openssl curl)

# find_swift: puts a Swift 6.3 toolchain on PATH (Swift is not a Debian package: install it from
# swift.org into /opt/swift, or put its usr/bin on PATH).
find_swift() {
    if ! command -v swift >/dev/null 2>&1; then
        for dir in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
            [ -x "$dir/swift" ] && export PATH="$dir:$PATH" && break
        done
    fi
    command -v swift >/dev/null 2>&1 || die "no Swift toolchain: install Swift 6.3 from swift.org (e.g. into /opt/swift) and retry"
    swift --version 2>/dev/null | grep -q "Swift version 6\." || die "Swift 6.x is required, found: $(swift --version 2>&1 | head -1)"
}
