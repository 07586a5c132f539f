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

/// socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); -1 with errno on failure.
int le_unix_stream_socket(void);

/// accept4 with SOCK_CLOEXEC; -1 with errno on failure.
int le_accept_cloexec(int listener);

/// The uid of a Unix socket's peer (SO_PEERCRED); -1 with errno on failure.
int le_peer_uid(int fd, uint32_t *uid);

/// eventfd(0, EFD_CLOEXEC); -1 with errno on failure.
int le_eventfd_cloexec(void);

#endif
