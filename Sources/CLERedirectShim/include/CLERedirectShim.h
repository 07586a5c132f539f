// What Swift cannot import by itself: _GNU_SOURCE-only calls and constants.
#ifndef CLEREDIRECT_SHIM_H
#define CLEREDIRECT_SHIM_H

#include <spawn.h>
#include <signal.h>
#include <stdint.h>

/// posix_spawn with POSIX_SPAWN_SETSID, stdin/stdout/stderr on `devnull_fd`, the given
/// descriptors moved to 3, 4, ... (in order) and every other descriptor closed, so the child keeps
/// nothing of its caller's open files (a hook runner waiting for EOF on a pipe returns at once).
/// Returns 0 or an errno value.
int le_spawn_detached(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                      int devnull_fd, const int *pass_fds, int pass_count);

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it creates later) and
/// returns a signalfd that reports them, or -1 with errno set.
int le_termination_signalfd(void);

/// Reads one signal number from a signalfd made by le_termination_signalfd; -1 on error.
int le_read_signalfd(int fd);

/// posix_spawnp of a command in the foreground: the caller's descriptors, process group and
/// environment, but every signal unblocked and at its default action (the caller blocks the
/// termination signals for its signalfd). Returns 0 or an errno value.
int le_spawn_foreground(pid_t *pid, const char *file, char *const argv[], char *const envp[]);

/// pidfd_open(pid, 0): a descriptor that polls readable once the process has exited; -1 with errno.
int le_pidfd_open(pid_t pid);

/// socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); -1 with errno on failure.
int le_unix_stream_socket(void);

/// accept4 with SOCK_CLOEXEC; -1 with errno on failure.
int le_accept_cloexec(int listener);

/// The uid of a Unix socket's peer (SO_PEERCRED); -1 with errno on failure.
int le_peer_uid(int fd, uint32_t *uid);

/// socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC); 0, or -1 with errno.
int le_socketpair_cloexec(int fds[2]);

/// eventfd(0, EFD_CLOEXEC); -1 with errno on failure.
int le_eventfd_cloexec(void);

// MARK: The validation proxy's socket plumbing

/// An IPv4 or IPv6 TCP endpoint: `family` is AF_INET or AF_INET6, `addr` the address in network
/// order (4 or 16 bytes used), `port` in host order, `scope_id` the interface of an IPv6
/// link-local address (0 otherwise): without it a link-local address cannot be connected to.
typedef struct {
    int family;
    uint8_t addr[16];
    uint16_t port;
    uint32_t scope_id;
} le_endpoint;

/// One epoll event, unpacked (struct epoll_event is packed on x86_64).
typedef struct {
    uint32_t events;
    uint64_t data;
} le_event;

/// epoll's constants (Swift's Glibc module does not carry <sys/epoll.h>).
enum {
    LE_EPOLLIN = 0x001,
    LE_EPOLLOUT = 0x004,
    LE_EPOLLERR = 0x008,
    LE_EPOLLHUP = 0x010,
    LE_EPOLL_CTL_ADD = 1,
    LE_EPOLL_CTL_DEL = 2,
    LE_EPOLL_CTL_MOD = 3,
};

int le_epoll_create(void);
/// epoll_ctl; `op` is EPOLL_CTL_ADD, _MOD or _DEL. 0 or -1 with errno.
int le_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/// epoll_wait into `out`; retries nothing (EINTR is returned as -1).
int le_epoll_wait(int epfd, le_event *out, int max, int timeout_ms);

/// A non-blocking, close-on-exec TCP listener on the wildcard address of `family` (IPv6 only
/// for AF_INET6), with SO_REUSEADDR; with `transparent`, IP_TRANSPARENT / IPV6_TRANSPARENT too
/// (connections steered by tproxy reach only such a listener; needs CAP_NET_ADMIN or CAP_NET_RAW).
/// The descriptor, or -1 with errno.
int le_tcp_listen(int family, uint16_t port, int backlog, int transparent);

/// accept4 (non-blocking, close-on-exec) with TCP_NODELAY set; fills `peer`. -1 with errno.
int le_tcp_accept(int listener, le_endpoint *peer);

/// Starts a non-blocking connect (TCP_NODELAY, close-on-exec). Returns the descriptor with
/// *in_progress set when the connection is still being made, or -1 with errno.
int le_tcp_connect(const le_endpoint *to, int *in_progress);

/// The local end of a connected socket (getsockname). 0, or -1 with errno.
int le_local_endpoint(int fd, le_endpoint *out);

/// The remote end of a connected socket (getpeername). 0, or -1 with errno.
int le_peer_endpoint(int fd, le_endpoint *out);

/// open(path, O_PATH | O_DIRECTORY | O_CLOEXEC): a directory to open files beneath.
int le_open_directory_path(const char *path);

/// Opens `path` (relative, components separated by '/') beneath the directory `dirfd` without
/// following a symbolic link anywhere on the way, nor leaving the directory (`..`, an absolute
/// path, another mount). With `use_openat2`, openat2(2) with RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV; where the kernel has no
/// openat2 (ENOSYS, or EPERM from a seccomp profile that predates it), or without `use_openat2`,
/// a walk that opens one component at a time with O_NOFOLLOW, refuses "." and "..", and stays on
/// the directory's file system. `flags` are the last component's open flags (O_NOFOLLOW
/// and O_CLOEXEC are added). The descriptor, or -1 with errno (ELOOP or ENOTDIR for a link).
int le_open_beneath(int dirfd, const char *path, int flags, int use_openat2);

/// SO_ERROR of a socket (the outcome of a non-blocking connect): 0 or an errno value.
int le_socket_error(int fd);

#endif
