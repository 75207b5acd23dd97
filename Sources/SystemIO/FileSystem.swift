#if canImport(Glibc)
import Glibc
#endif

/// Thin wrappers over the file-system calls the agent makes, with explicit modes: nothing here depends on the
/// process's umask.
public enum FileSystem {
    /// Bytes a file occupies on disk.
    public static func allocatedBytes(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }

    public static func fileSize(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_size)
    }

    /// Bytes available to an unprivileged writer on the file system holding `path`.
    public static func freeBytes(_ path: String) -> UInt64? {
        var s = statvfs()
        guard statvfs(path, &s) == 0 else { return nil }
        return UInt64(s.f_bavail) * UInt64(s.f_frsize)
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Makes `path` and any missing parents with exactly `mode` (parents that exist keep theirs).
    public static func makeDirectory(_ path: String, mode: mode_t = 0o755) throws {
        if isDirectory(path) { return }
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try makeDirectory(String(path[..<slash]), mode: mode)
        }
        if mkdir(path, mode) != 0 {
            guard errno == EEXIST, isDirectory(path) else { throw FileError("mkdir", path: path, errno: errno) }
            return
        }
        if chmod(path, mode) != 0 { throw FileError("chmod", path: path, errno: errno) }
    }

    /// Names in a directory (no `.` and `..`); empty when it cannot be read.
    public static func list(_ directory: String) -> [String] {
        guard let d = opendir(directory) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }

    /// Removes a file; a missing file is not an error.
    public static func remove(_ path: String) throws {
        if unlink(path) != 0 && errno != ENOENT { throw FileError("unlink", path: path, errno: errno) }
    }

    /// Removes an empty directory; returns false (and changes nothing) when it is not empty or missing.
    @discardableResult
    public static func removeDirectoryIfEmpty(_ path: String) throws -> Bool {
        if rmdir(path) == 0 { return true }
        if errno == ENOTEMPTY || errno == EEXIST || errno == ENOENT { return false }
        throw FileError("rmdir", path: path, errno: errno)
    }

    /// Writes a small file atomically (a temporary name, fsync, rename) with exactly `mode`.
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws {
        let out = OutputFile(path: path, mode: mode)
        try out.create()
        do {
            try out.pwriteAll(bytes, at: 0)
            try out.commit()
        } catch {
            out.discard()
            throw error
        }
    }

    /// Up to `count` bytes from the start of a file (fewer at its end; nil when it cannot be opened).
    public static func readPrefix(_ path: String, count: Int) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(done)) }
            if n < 0 { if errno == EINTR { continue }; return nil }
            if n == 0 { break }
            done += n
        }
        return Array(buf[0..<done])
    }

    /// The whole content of a small file, at most `limit` bytes (nil when missing or larger).
    public static func read(_ path: String, limit: Int = 1 << 20) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; return nil }
            if n == 0 { return out }
            out += buf[0..<n]
            if out.count > limit { return nil }
        }
    }
}
