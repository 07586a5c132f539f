#define _GNU_SOURCE
#include "CLERedirectSandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/landlock.h>
#include <seccomp.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

int le_drop_privileges(uint32_t uid, uint32_t gid, const uint32_t *groups, int group_count) {
    if (uid == 0 || gid == 0) return EINVAL;
    for (int i = 0; i < group_count; i++)
        if (groups[i] == 0) return EINVAL;
    // The bounding set first: dropping from it takes CAP_SETPCAP, which goes with uid 0.
    for (int cap = 0; cap < 64; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) {
            if (errno == EINVAL) break;  // past the last capability this kernel knows
            return errno;
        }
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return errno;
    gid_t list[64];
    if (group_count > 64) return EINVAL;
    for (int i = 0; i < group_count; i++) list[i] = (gid_t)groups[i];
    if (setgroups((size_t)group_count, list) != 0) return errno;
    if (setresgid(gid, gid, gid) != 0) return errno;
    // Leaving uid 0 for good clears the permitted and effective capabilities (no SECBIT_KEEP_CAPS).
    if (setresuid(uid, uid, uid) != 0) return errno;
    if (setuid(0) == 0 || seteuid(0) == 0) return EPERM;
    uid_t r, e, s;
    if (getresuid(&r, &e, &s) != 0 || r != uid || e != uid || s != uid) return EPERM;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return errno;
    return 0;
}

// Landlock's ABI, defined here where the build's kernel headers are older than the kernel.
#define LL_FS_V1 ((1ULL << 13) - 1)
#define LL_FS_REFER (1ULL << 13)
#define LL_FS_TRUNCATE (1ULL << 14)
#define LL_FS_IOCTL_DEV (1ULL << 15)
#define LL_NET_BIND_TCP (1ULL << 0)
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_RULE_NET_PORT 2
#define LL_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define LL_SCOPE_SIGNAL (1ULL << 1)

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

struct ll_net_port_attr {
    uint64_t allowed_access;
    uint64_t port;
};

int le_landlock_restrict(int readable_dir, const uint16_t *connect_ports, int port_count, int *abi_out) {
    *abi_out = 0;
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 0) return (errno == ENOSYS || errno == EOPNOTSUPP) ? 0 : errno;
    struct ll_ruleset_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.handled_access_fs = LL_FS_V1;
    if (abi >= 2) attr.handled_access_fs |= LL_FS_REFER;
    if (abi >= 3) attr.handled_access_fs |= LL_FS_TRUNCATE;
    if (abi >= 5) attr.handled_access_fs |= LL_FS_IOCTL_DEV;
    if (abi >= 4) attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP;
    if (abi >= 6) attr.scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL;
    size_t size = abi >= 6 ? sizeof attr : abi >= 4 ? offsetof(struct ll_ruleset_attr, scoped)
                                                    : offsetof(struct ll_ruleset_attr, handled_access_net);
    int ruleset = (int)syscall(__NR_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0) return errno;
    int rc = 0;
    if (readable_dir >= 0) {
        struct ll_path_beneath_attr beneath = {
            .allowed_access = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR,
            .parent_fd = readable_dir,
        };
        if (syscall(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &beneath, 0) != 0) rc = errno;
    }
    for (int i = 0; rc == 0 && abi >= 4 && i < port_count; i++) {
        struct ll_net_port_attr port = {.allowed_access = LL_NET_CONNECT_TCP, .port = connect_ports[i]};
        if (syscall(__NR_landlock_add_rule, ruleset, LL_RULE_NET_PORT, &port, 0) != 0) rc = errno;
    }
    if (rc == 0 && syscall(__NR_landlock_restrict_self, ruleset, 0) != 0) rc = errno;
    close(ruleset);
    if (rc == 0) *abi_out = (int)abi;
    return rc;
}

int le_seccomp_load(int landlocked) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
    if (ctx == NULL) return -ENOMEM;
    // What the relay's loop, the allocator and the runtime do once the proxy serves.
    static const int allowed[] = {
        // descriptors and I/O
        SCMP_SYS(read), SCMP_SYS(write), SCMP_SYS(readv), SCMP_SYS(writev), SCMP_SYS(close),
        SCMP_SYS(fstat), SCMP_SYS(newfstatat), SCMP_SYS(statx),
        // sockets: accepting, relaying, connecting to the app and the challenge server, sock_diag
        SCMP_SYS(accept4), SCMP_SYS(connect), SCMP_SYS(shutdown), SCMP_SYS(recvfrom), SCMP_SYS(sendto),
        SCMP_SYS(recvmsg), SCMP_SYS(sendmsg), SCMP_SYS(getsockname), SCMP_SYS(getpeername),
        SCMP_SYS(getsockopt), SCMP_SYS(setsockopt), SCMP_SYS(bind),
        // the event loop and its clock
        SCMP_SYS(epoll_wait), SCMP_SYS(epoll_pwait), SCMP_SYS(epoll_pwait2), SCMP_SYS(epoll_ctl),
        SCMP_SYS(poll), SCMP_SYS(ppoll), SCMP_SYS(clock_gettime), SCMP_SYS(gettimeofday),
        SCMP_SYS(nanosleep), SCMP_SYS(clock_nanosleep),
        // memory, futexes, signals, identity, exit
        SCMP_SYS(brk), SCMP_SYS(mmap), SCMP_SYS(munmap), SCMP_SYS(mremap), SCMP_SYS(madvise),
        SCMP_SYS(mprotect), SCMP_SYS(futex), SCMP_SYS(rt_sigprocmask), SCMP_SYS(rt_sigreturn),
        SCMP_SYS(sigaltstack), SCMP_SYS(getpid), SCMP_SYS(gettid), SCMP_SYS(getuid), SCMP_SYS(geteuid),
        SCMP_SYS(getgid), SCMP_SYS(getegid), SCMP_SYS(getrandom), SCMP_SYS(sched_yield),
        SCMP_SYS(restart_syscall), SCMP_SYS(exit), SCMP_SYS(exit_group), SCMP_SYS(getrlimit), SCMP_SYS(uname),
    };
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < sizeof allowed / sizeof allowed[0]; i++)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, allowed[i], 0);
    // Files are only ever opened to read (the webroot's): no write, create, truncate, append or
    // temporary file, whether or not Landlock is there. openat2's flags are in a struct seccomp
    // cannot see: allowed only under Landlock, ENOSYS otherwise (the shim then walks with openat).
    const scmp_datum_t writing = O_ACCMODE | O_CREAT | O_TRUNC | O_APPEND | 020000000 /* O_TMPFILE without O_DIRECTORY */;
    if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(openat), 1, SCMP_A2(SCMP_CMP_MASKED_EQ, writing, 0));
    if (rc == 0) rc = seccomp_rule_add(ctx, landlocked ? SCMP_ACT_ALLOW : SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(openat2), 0);
    // fcntl: reading and setting close-on-exec and reading the status flags; never F_SETFL (the
    // session log stays append-only).
    static const int fcntls[] = {F_GETFD, F_SETFD, F_GETFL};
    for (size_t i = 0; rc == 0 && i < 3; i++)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(fcntl), 1, SCMP_A1(SCMP_CMP_EQ, (scmp_datum_t)fcntls[i]));
    // prlimit64: its own limits, read only (what getrlimit does).
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(prlimit64), 2, SCMP_A0(SCMP_CMP_EQ, 0), SCMP_A2(SCMP_CMP_EQ, 0));
    // socket(2): TCP over IPv4 and IPv6, netlink's route (getifaddrs) and sock_diag buses; other
    // datagram and Unix sockets fail with EAFNOSUPPORT (what a library trying them falls back
    // from), anything else kills.
    const scmp_datum_t type_mask = 0xf;  // without SOCK_NONBLOCK and SOCK_CLOEXEC
    static const int inet[] = {AF_INET, AF_INET6};
    for (size_t i = 0; rc == 0 && i < 2; i++) {
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 2, SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)inet[i]),
                              SCMP_A1(SCMP_CMP_MASKED_EQ, type_mask, SOCK_STREAM));
        if (rc == 0)
            rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 2,
                                  SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)inet[i]),
                                  SCMP_A1(SCMP_CMP_MASKED_EQ, type_mask, SOCK_DGRAM));
    }
    static const int buses[] = {0 /* NETLINK_ROUTE */, 4 /* NETLINK_SOCK_DIAG */};
    for (size_t i = 0; rc == 0 && i < 2; i++)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 2, SCMP_A0(SCMP_CMP_EQ, AF_NETLINK),
                              SCMP_A2(SCMP_CMP_EQ, (scmp_datum_t)buses[i]));
    static const int refused[] = {AF_UNIX, AF_PACKET};
    for (size_t i = 0; rc == 0 && i < 2; i++)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1,
                              SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)refused[i]));
    // tgkill to itself only: abort() on a crash.
    if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1, SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid()));
    if (rc == 0) rc = seccomp_load(ctx);
    seccomp_release(ctx);
    return rc;
}

void le_forbidden_syscall(void) {
    syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0);
}
