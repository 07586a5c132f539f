// The proxy process's confinement (docs/design.md, "Processes"): privileges dropped for good,
// Landlock, and a seccomp filter, each a plain C call so that nothing in between allocates.
#ifndef CLEREDIRECT_SANDBOX_H
#define CLEREDIRECT_SANDBOX_H

#include <stdint.h>
#include <sys/types.h>

/// Drops every privilege for good: the capability bounding set and the ambient set emptied,
/// supplementary groups set to `groups`, real/effective/saved gid and uid set, no_new_privs set,
/// and the process made non-dumpable (nobody else running as that user may ptrace it or read its
/// memory). Checks afterwards that uid 0 cannot be regained. 0, or an errno value.
int le_drop_privileges(uint32_t uid, uint32_t gid, const uint32_t *groups, int group_count);

/// Restricts the process with Landlock, to the best ABI the kernel has: no file system access at
/// all but reading files and directories beneath `readable_dir` (an O_PATH descriptor; -1 for
/// none); no TCP bind, and TCP connect only to the `port_count` `connect_ports` (ABI 4+); no
/// signals or abstract Unix sockets outside the process (ABI 6+). Sets *abi to the ABI used: 0
/// when the kernel has no Landlock (not an error). 0, or an errno value.
int le_landlock_restrict(int readable_dir, const uint16_t *connect_ports, int port_count, int *abi);

/// Loads the proxy's seccomp filter: the system calls the relay makes are allowed; files opened
/// read-only (openat2 only when `landlocked`, else ENOSYS); fcntl without F_SETFL; prlimit64 only
/// to read its own limits; socket(2) only for TCP over IPv4 and IPv6 and netlink's route and
/// sock_diag buses (UDP and Unix sockets fail with EAFNOSUPPORT); any other call kills the
/// process (SIGSYS). 0, or a negative errno value from libseccomp.
int le_seccomp_load(int landlocked);

/// A system call the filter does not allow (for the fault test of the filter): never returns
/// once the filter is loaded.
void le_forbidden_syscall(void);

#endif
