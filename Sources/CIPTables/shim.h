// libiptc (libip4tc and libip6tc), and the x_tables uapi structures of the matches and targets
// le-redirect's rules use.
#include <stdint.h>
#include <sys/socket.h>
// glibc first: linux/libc-compat.h then skips the uapi copies of in_addr and friends.
#include <netinet/in.h>
#include <net/if.h>
#include <libiptc/libiptc.h>
#include <libiptc/libip6tc.h>
#include <linux/netfilter/x_tables.h>
#include <linux/netfilter/xt_addrtype.h>
#include <linux/netfilter/xt_comment.h>
#include <linux/netfilter/xt_tcpudp.h>
#include <linux/netfilter/xt_time.h>
#include <linux/netfilter/xt_TPROXY.h>
#include <linux/netfilter/nf_conntrack_common.h>

