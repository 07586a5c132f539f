import Glibc
import LERedirectModel

/// The directory that holds a session's lock, journal and control socket (/run/le-redirect, or
/// LE_REDIRECT_STATE_DIR). Mode 0700, owned by the caller, never reached through a symlink.
struct StateDirectory: Sendable {
    /// The default in the host's own network namespace (PID 1's).
    static let defaultPath = "/run/le-redirect"
    static let environmentVariable = "LE_REDIRECT_STATE_DIR"

    let path: String

    var lockPath: String { path + "/lock" }
    var journalPath: String { path + "/journal" }
    var controlSocketPath: String { path + "/control.sock" }
    var logPath: String { path + "/session.log" }

    /// The explicit path, else the environment's, else the default for this network namespace.
    static func resolve(_ explicit: String?) -> StateDirectory {
        if let explicit, !explicit.isEmpty { return StateDirectory(path: normalise(explicit)) }
        if let env = getenv(environmentVariable), env.pointee != 0 {
            return StateDirectory(path: normalise(cString(env)))
        }
        return StateDirectory(
            path: defaultPath(namespace: try? ProcessFacts.currentNamespace(), initial: try? ProcessFacts.namespace(ofPID: 1)))
    }

    /// /run/le-redirect in the host's own network namespace, and /run/le-redirect/netns/INODE in
    /// any other: sessions in two namespaces never share a lock, a journal or a control socket,
    /// and neither sees the other's session. The host's own is PID 1's; where that cannot be read
    /// (some sandboxes), the one with the inode the kernel reserves for it (0xEFFFFFF9, PROC_NET_INIT_INO,
    /// on kernels that reserve one). When this process's own cannot be read: /run/le-redirect.
    static func defaultPath(namespace: NamespaceIdentity?, initial: NamespaceIdentity?) -> String {
        guard let namespace else { return defaultPath }
        let isHosts = initial.map { $0 == namespace } ?? (namespace.inode == initialNamespaceInode)
        return isHosts ? defaultPath : "\(defaultPath)/netns/\(namespace.inode)"
    }

    static let initialNamespaceInode: UInt64 = 0xEFFF_FFF9

    private static func normalise(_ path: String) -> String {
        var p = path
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        return p
    }

    /// Creates the directory if it is missing and checks it is safe to keep root's state in.
    func prepare() throws(LERedirectError) {
        guard path.hasPrefix("/") else {
            throw LERedirectError(.invalidArgument, "state directory '\(path)' must be an absolute path")
        }
        try checkAncestors()
        // A namespace's default directory sits below the host's, which may not exist yet.
        if path.hasPrefix(Self.defaultPath + "/netns/") {
            for parent in [Self.defaultPath, Self.defaultPath + "/netns"] where mkdir(parent, 0o700) != 0 && errno != EEXIST {
                let code = errno
                throw LERedirectError(
                    code == EACCES || code == EPERM ? .notPermitted : .failed,
                    "creating \(parent): \(errnoText(code))", errno: code)
            }
        }
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            let code = errno
            throw LERedirectError(
                code == EACCES || code == EPERM ? .notPermitted : .failed,
                "creating the state directory \(path): \(errnoText(code))"
                    + (code == EACCES || code == EPERM ? " (le-redirect needs root)" : ""), errno: code)
        }
        try check()
    }

    /// Checks an existing directory without creating it; false when it does not exist.
    func exists() throws(LERedirectError) -> Bool {
        var st = stat()
        if lstat(path, &st) != 0 {
            if errno == ENOENT { return false }
            throw LERedirectError(.failed, "reading the state directory \(path): \(errnoText(errno))", errno: errno)
        }
        try check()
        return true
    }

    private func check() throws(LERedirectError) {
        try checkAncestors()
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let code = errno
            throw LERedirectError(
                code == EACCES ? .notPermitted : .failed, "reading the state directory \(path): \(errnoText(code))",
                errno: code)
        }
        if st.st_mode & S_IFMT == S_IFLNK {
            throw LERedirectError(.failed, "the state directory \(path) is a symbolic link; refusing to use it")
        }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            throw LERedirectError(.failed, "the state directory \(path) is not a directory")
        }
        guard st.st_uid == geteuid() else {
            throw LERedirectError(
                geteuid() == 0 ? .failed : .notPermitted,
                "the state directory \(path) belongs to uid \(st.st_uid), not to this process (uid \(geteuid()))"
                    + (geteuid() == 0 ? "; refusing to use it" : " (le-redirect needs root)"))
        }
        guard st.st_mode & 0o077 == 0 else {
            throw LERedirectError(
                .failed,
                "the state directory \(path) is accessible to other users (mode \(String(st.st_mode & 0o777, radix: 8))); "
                    + "make it 0700 or remove it")
        }
    }

    /// Every directory above this one must be safe from other users, as sshd checks the path to
    /// its files: owned by root or by this process's user, and writable by no one else unless it is
    /// sticky (like /tmp, where no one else may rename or remove what is not theirs). Otherwise
    /// another user could move the state directory away and put one of their own in its place.
    private func checkAncestors() throws(LERedirectError) {
        guard let slash = path.lastIndex(of: "/") else { return }
        let parent = slash == path.startIndex ? "/" : String(path[..<slash])
        // The path as given (a link on the way must be safe from others too, or it could be
        // pointed elsewhere later), then the directories it leads to.
        try checkComponents(of: parent)
        guard let real = realpath(parent, nil) else {
            let code = errno
            if code == ENOENT { return }  // a missing parent: mkdir says so
            throw LERedirectError(.failed, "resolving \(parent), above the state directory: \(errnoText(code))", errno: code)
        }
        let resolved = cString(real)
        free(real)
        if resolved != parent { try checkComponents(of: resolved) }
    }

    private func checkComponents(of directory: String) throws(LERedirectError) {
        var prefix = ""
        for component in [""] + directory.split(separator: "/").map(String.init) {
            prefix = component.isEmpty ? "/" : (prefix == "/" ? "" : prefix) + "/" + component
            var st = stat()
            guard lstat(prefix, &st) == 0 else {
                let code = errno
                if code == ENOENT { return }  // mkdir says so
                throw LERedirectError(.failed, "reading \(prefix), above the state directory: \(errnoText(code))", errno: code)
            }
            let owner = st.st_uid
            // A symbolic link's own mode bits mean nothing; its directory's were checked before it.
            let isLink = st.st_mode & S_IFMT == S_IFLNK
            let writableByOthers = !isLink && st.st_mode & 0o022 != 0 && st.st_mode & S_ISVTX == 0
            guard (owner == 0 || owner == geteuid()) && !writableByOthers else {
                let mode = String(st.st_mode & 0o7777, radix: 8)
                throw LERedirectError(
                    .failed,
                    "the state directory \(path) is below \(prefix) (uid \(owner), mode \(mode)), which "
                        + (writableByOthers ? "other users may write to" : "belongs to another user")
                        + ": it could be swapped for another directory under le-redirect. Use a state directory below "
                        + "directories that only root may change (the default /run/le-redirect, or --state-dir)")
            }
        }
    }

    // MARK: Lock

    /// Takes the lock that serialises le-redirect processes, waiting up to `timeout` for it.
    func lock(timeout: Duration = .seconds(30)) throws(LERedirectError) -> StateLock {
        let fd = open(lockPath, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let code = errno
            throw LERedirectError(
                code == EACCES ? .notPermitted : .failed, "opening the lock \(lockPath): \(errnoText(code))", errno: code)
        }
        let deadline = monotonicMilliseconds() + timeout.milliseconds
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            if code == EINTR { continue }
            guard code == EWOULDBLOCK else {
                closeDescriptor(fd)
                throw LERedirectError(.failed, "locking \(lockPath): \(errnoText(code))", errno: code)
            }
            if monotonicMilliseconds() >= deadline {
                closeDescriptor(fd)
                let holder = (try? readFile(lockPath)).map { String(decoding: $0, as: UTF8.self) } ?? ""
                let pid = holder.split(separator: "\n").first.map(String.init) ?? "?"
                throw LERedirectError(
                    .conflict,
                    "another le-redirect process (pid \(pid)) has held \(lockPath) for over "
                        + "\(DurationText.format(timeout)); nothing was changed")
            }
            usleep(10_000)
        }
        // Record who holds it, for the message above.
        _ = ftruncate(fd, 0)
        let text = Array("\(getpid())\n".utf8)
        _ = text.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return StateLock(fd: fd)
    }

    // MARK: Journal

    /// The journal's text, or nil when there is none.
    func readJournal() throws(LERedirectError) -> String? {
        do throws(SystemError) {
            let bytes = try readFile(journalPath, maxBytes: 1 << 20, noFollow: true)
            return String(decoding: bytes, as: UTF8.self)
        } catch {
            if error.errno == ENOENT { return nil }
            if error.errno == ELOOP {
                throw LERedirectError(.failed, "the journal \(journalPath) is a symbolic link; refusing to read it")
            }
            throw LERedirectError(.failed, "reading the journal: \(error)", errno: error.errno)
        }
    }

    /// Replaces the journal atomically and durably: temporary file, fsync, rename, fsync of the directory.
    func writeJournal(_ journal: Journal) throws(LERedirectError) {
        let temporary = journalPath + ".tmp"
        do throws(SystemError) {
            _ = unlink(temporary)
            let fd = try syscall("open", temporary) {
                open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            }
            do throws(SystemError) {
                try writeAll(fd, Array(journal.encoded().utf8), subject: temporary)
                try syscall("fsync", temporary) { fsync(fd) }
            } catch {
                closeDescriptor(fd)
                _ = unlink(temporary)
                throw error
            }
            closeDescriptor(fd)
            try syscall("rename", "\(temporary) to \(journalPath)") { rename(temporary, journalPath) }
            try syncDirectory()
        } catch {
            throw LERedirectError(.failed, "writing the journal: \(error)", errno: error.errno)
        }
    }

    func deleteJournal() throws(LERedirectError) {
        let injected = Fault.injectedErrno("unlink")
        if injected != nil || (unlink(journalPath) != 0 && errno != ENOENT) {
            let code = injected ?? errno
            throw LERedirectError(.failed, "deleting the journal \(journalPath): \(errnoText(code))", errno: code)
        }
        do throws(SystemError) { try syncDirectory() } catch {
            throw LERedirectError(.failed, "deleting the journal: \(error)", errno: error.errno)
        }
    }

    private func syncDirectory() throws(SystemError) {
        let fd = try syscall("open", path) { open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { closeDescriptor(fd) }
        try syscall("fsync", path) { fsync(fd) }
    }
}

/// The held state lock. Released by `release()`, or when its process exits (flock).
struct StateLock: ~Copyable {
    let fd: Int32

    consuming func release() {
        closeDescriptor(fd)
        discard self
    }

    deinit { closeDescriptor(fd) }
}
