import CLERedirectShim
import Glibc
import LERedirectModel

/// The `--webroot` challenge source: a file named by the token, in DIR or in
/// DIR/.well-known/acme-challenge, read for any client by the proxy process, which runs as an
/// unprivileged user (with the webroot's group) and, where the kernel has Landlock, can read
/// nothing outside DIR.
///
/// Why it is careful as well: whoever owns the webroot can put anything there, and the proxy must
/// not read for them what they could not read themselves. So a file is opened beneath the directory opened
/// at begin, no symbolic link followed on the way (a `.well-known -> /etc` link serves nothing),
/// and it is served only when the directory's owner may read it by its mode bits (its user, one of
/// its groups, or everyone; a root-owned webroot serves only world-readable files): never a file
/// only root can read, whatever a hard link or a bind mount put there.
final class Webroot {
    let path: String
    private let directory: Int32
    private let owner: uid_t
    /// The directory's group.
    let group: gid_t
    private let ownerGroups: Set<gid_t>

    static let maxFileSize = 65536

    /// Opens DIR (following the operator's own path to it) and learns its owner.
    init(_ path: String) throws(LERedirectError) {
        let fd = le_open_directory_path(path)
        guard fd >= 0 else {
            let code = errno
            throw LERedirectError(
                .invalidArgument, "--webroot \(path): opening the directory: \(errnoText(code)). Nothing was changed",
                errno: code)
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let code = errno
            closeDescriptor(fd)
            throw LERedirectError(.failed, "--webroot \(path): reading its owner: \(errnoText(code))", errno: code)
        }
        self.path = path
        directory = fd
        owner = st.st_uid
        group = st.st_gid
        ownerGroups = owner == 0 ? [] : Self.groups(of: st.st_uid)
    }

    deinit { closeDescriptor(directory) }

    /// The directory (O_PATH), for Landlock's rule.
    var directoryDescriptor: Int32 { directory }

    /// The file's contents for a valid token, or nil (no such file, a link on the way, not a
    /// regular file, too large, or not readable by the webroot's owner).
    func keyAuthorization(for token: String) -> String? {
        guard ChallengeToken.isValid(token) else { return nil }
        let useOpenat2: Int32 = Fault.injectedErrno("openat2") == nil ? 1 : 0
        for relative in [token, ".well-known/acme-challenge/" + token] {
            let fd = le_open_beneath(directory, relative, O_RDONLY | O_NONBLOCK, useOpenat2)
            if fd < 0 { continue }
            defer { closeDescriptor(fd) }
            var st = stat()
            guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_size <= Self.maxFileSize,
                ownerMayRead(st)
            else { continue }
            var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n == bytes.count { return String(decoding: bytes, as: UTF8.self) }
        }
        return nil
    }

    private func ownerMayRead(_ st: stat) -> Bool {
        if st.st_mode & S_IROTH != 0 { return true }
        guard owner != 0 else { return false }
        if st.st_uid == owner { return st.st_mode & S_IRUSR != 0 }
        return ownerGroups.contains(st.st_gid) && st.st_mode & S_IRGRP != 0
    }

    /// The user's primary and supplementary groups, from the user database; none when the uid has
    /// no entry (then only its own and world-readable files count).
    private static func groups(of uid: uid_t) -> Set<gid_t> {
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        guard getpwuid_r(uid, &entry, &buffer, buffer.count, &result) == 0, result != nil, let name = entry.pw_name else {
            return []
        }
        var count: Int32 = 64
        var list = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(name, entry.pw_gid, &list, &count) < 0 {
            list = [gid_t](repeating: 0, count: Int(count))
            guard getgrouplist(name, entry.pw_gid, &list, &count) >= 0 else { return [entry.pw_gid] }
        }
        return Set(list.prefix(Int(count)))
    }
}
