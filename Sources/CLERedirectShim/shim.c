#define _GNU_SOURCE
#include "CLERedirectShim.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>

int le_spawn_detached(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                      int devnull_fd, const int *pass_fds, int pass_count) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    int rc = posix_spawn_file_actions_init(&actions);
    if (rc != 0) return rc;
    rc = posix_spawnattr_init(&attr);
    if (rc != 0) { posix_spawn_file_actions_destroy(&actions); return rc; }

    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                             POSIX_SPAWN_SETSIGDEF);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);

    // Move the passed descriptors above the target range and above every source first, so that
    // moving one to 3+i never clobbers another that still waits for its turn.
    int staging = 64;
    if (devnull_fd >= staging) staging = devnull_fd + 1;
    for (int i = 0; i < pass_count; i++)
        if (pass_fds[i] >= staging) staging = pass_fds[i] + 1;
    for (int i = 0; rc == 0 && i < pass_count; i++)
        rc = posix_spawn_file_actions_adddup2(&actions, pass_fds[i], staging + i);
    for (int i = 0; rc == 0 && i < 3; i++)
        rc = posix_spawn_file_actions_adddup2(&actions, devnull_fd, i);
    for (int i = 0; rc == 0 && i < pass_count; i++)
        rc = posix_spawn_file_actions_adddup2(&actions, staging + i, 3 + i);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&actions, 3 + pass_count);

    if (rc == 0) rc = posix_spawn(pid, path, &actions, &attr, argv, envp);
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&actions);
    return rc;
}

int le_termination_signalfd(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    int rc = pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (rc != 0) { errno = rc; return -1; }
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

int le_read_signalfd(int fd) {
    struct signalfd_siginfo info;
    ssize_t n = read(fd, &info, sizeof info);
    if (n != (ssize_t)sizeof info) return -1;
    return (int)info.ssi_signo;
}

int le_spawn_foreground(pid_t *pid, const char *file, char *const argv[], char *const envp[]) {
    posix_spawnattr_t attr;
    int rc = posix_spawnattr_init(&attr);
    if (rc != 0) return rc;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
    if (rc == 0) rc = posix_spawnp(pid, file, NULL, &attr, argv, envp);
    posix_spawnattr_destroy(&attr);
    return rc;
}

int le_pidfd_open(pid_t pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int le_unix_stream_socket(void) {
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

int le_accept_cloexec(int listener) {
    return accept4(listener, NULL, NULL, SOCK_CLOEXEC);
}

int le_peer_uid(int fd, uint32_t *uid) {
    struct ucred credentials;
    socklen_t length = sizeof credentials;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) return -1;
    *uid = credentials.uid;
    return 0;
}

int le_eventfd_cloexec(void) {
    return eventfd(0, EFD_CLOEXEC);
}

// MARK: The validation proxy's socket plumbing

_Static_assert(LE_EPOLLIN == EPOLLIN && LE_EPOLLOUT == EPOLLOUT && LE_EPOLLERR == EPOLLERR && LE_EPOLLHUP == EPOLLHUP,
               "epoll event bits");
_Static_assert(LE_EPOLL_CTL_ADD == EPOLL_CTL_ADD && LE_EPOLL_CTL_DEL == EPOLL_CTL_DEL && LE_EPOLL_CTL_MOD == EPOLL_CTL_MOD,
               "epoll_ctl operations");
_Static_assert(sizeof(((le_endpoint *)0)->addr) == sizeof(struct in6_addr), "le_endpoint holds an IPv6 address");

static socklen_t to_sockaddr(const le_endpoint *e, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof(*ss));
    if (e->family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(e->port);
        s6->sin6_scope_id = e->scope_id;
        memcpy(&s6->sin6_addr, e->addr, 16);
        return sizeof(*s6);
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(e->port);
    memcpy(&s4->sin_addr, e->addr, 4);
    return sizeof(*s4);
}

static void from_sockaddr(const struct sockaddr_storage *ss, le_endpoint *e) {
    memset(e, 0, sizeof(*e));
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        e->family = AF_INET6;
        e->port = ntohs(s6->sin6_port);
        e->scope_id = s6->sin6_scope_id;
        memcpy(e->addr, &s6->sin6_addr, 16);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        e->family = AF_INET;
        e->port = ntohs(s4->sin_port);
        memcpy(e->addr, &s4->sin_addr, 4);
    }
}

int le_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int le_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {.events = events, .data = {.u64 = data}};
    return epoll_ctl(epfd, op, fd, &ev);
}

int le_epoll_wait(int epfd, le_event *out, int max, int timeout_ms) {
    struct epoll_event evs[256];
    if (max > 256) max = 256;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        out[i].events = evs[i].events;
        out[i].data = evs[i].data.u64;
    }
    return n;
}

int le_tcp_listen(int family, uint16_t port, int backlog, int transparent) {
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (transparent) {
        int rc = family == AF_INET6 ? setsockopt(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, &one, sizeof(one))
                                    : setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one));
        if (rc != 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
    }
    le_endpoint any = {.family = family, .port = port};
    struct sockaddr_storage ss;
    socklen_t len = to_sockaddr(&any, &ss);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, backlog) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int le_tcp_accept(int listener, le_endpoint *peer) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int fd = accept4(listener, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    from_sockaddr(&ss, peer);
    return fd;
}

int le_tcp_connect(const le_endpoint *to, int *in_progress) {
    int fd = socket(to->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct sockaddr_storage ss;
    socklen_t len = to_sockaddr(to, &ss);
    *in_progress = 0;
    if (connect(fd, (struct sockaddr *)&ss, len) != 0) {
        if (errno == EINPROGRESS) {
            *in_progress = 1;
        } else {
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
    }
    return fd;
}

int le_local_endpoint(int fd, le_endpoint *out) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) return -1;
    from_sockaddr(&ss, out);
    return 0;
}

int le_peer_endpoint(int fd, le_endpoint *out) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &len) != 0) return -1;
    from_sockaddr(&ss, out);
    return 0;
}

int le_open_directory_path(const char *path) { return open(path, O_PATH | O_DIRECTORY | O_CLOEXEC); }

static int open_walking(int dirfd, const char *path, int flags) {
    char component[256];
    struct stat st;
    if (fstat(dirfd, &st) != 0) return -1;
    dev_t device = st.st_dev;  // no other mount: RESOLVE_NO_XDEV's walk
    int at = dirfd, owned = -1;
    const char *p = path;
    for (;;) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n == 0 || n >= sizeof(component) || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) {
            if (owned >= 0) close(owned);
            errno = n >= sizeof(component) ? ENAMETOOLONG : EXDEV;
            return -1;
        }
        memcpy(component, p, n);
        component[n] = 0;
        int fd = slash ? openat(at, component, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                       : openat(at, component, flags | O_NOFOLLOW | O_CLOEXEC);
        int saved = errno;
        if (owned >= 0) close(owned);
        if (fd < 0) {
            errno = saved;
            return -1;
        }
        if (fstat(fd, &st) != 0 || st.st_dev != device) {
            close(fd);
            errno = EXDEV;
            return -1;
        }
        if (!slash) return fd;
        at = owned = fd;
        p = slash + 1;
    }
}

int le_open_beneath(int dirfd, const char *path, int flags, int use_openat2) {
    if (use_openat2) {
        struct open_how how;
        memset(&how, 0, sizeof(how));
        how.flags = (uint64_t)(flags | O_NOFOLLOW | O_CLOEXEC);
        how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
        long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
        // ENOSYS: a kernel before 5.6; EPERM: a seccomp profile that does not know openat2.
        if (fd >= 0 || (errno != ENOSYS && errno != EPERM)) return (int)fd;
    }
    return open_walking(dirfd, path, flags);
}

int le_socket_error(int fd) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
    return err;
}

int le_socketpair_cloexec(int fds[2]) {
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
}
