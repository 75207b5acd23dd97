#if canImport(Glibc)
import Glibc
#endif

/// The resident pages of this process's read-only file mappings (its executable's code, the Swift runtime,
/// Foundation, librados): what they hold and how to hand them back to the kernel while the process is idle.
///
/// Those pages are clean copies of files; the kernel drops them under memory pressure anyway and pages them in
/// again on the next touch. `MADV_PAGEOUT` (Linux 5.4) asks for that now: the pages this process alone maps are
/// reclaimed at once, pages other processes map stay (the kernel skips them), and nothing changes for the process
/// but the minor or major faults of its next run of that code. Android compacts its cached apps the same way.
/// Writable mappings are never touched: a written page of a private mapping is anonymous memory, and a shared
/// writable one (SQLite's `-shm`) would be written back.
public enum Residency {
    /// One line of `/proc/<pid>/maps` that `pageOut` may advise: file-backed and not writable.
    public struct Mapping: Equatable, Sendable {
        public var start: UInt
        public var end: UInt
        public var path: String
    }

    /// Pages handed back by one `pageOut`.
    public struct Result: Sendable {
        /// Mappings advised.
        public var mappings: Int
        /// Their size in bytes (resident or not).
        public var bytes: UInt64
        /// Mappings the kernel refused (EINVAL on a locked or special mapping, ENOSYS before Linux 5.4).
        public var refused: Int
    }

    /// `MADV_PAGEOUT` from linux/mman.h (glibc 2.36 names it only with `_GNU_SOURCE`).
    static let madvPageOut: Int32 = 21

    /// The file-backed, non-writable mappings in the text of a `maps` file: `start-end perms offset dev inode
    /// path`. Lines without a path (anonymous), with a pseudo-path (`[heap]`, `[vdso]`, `memfd:`) or with `w` in
    /// their permissions are left out, as are malformed ones.
    public static func readOnlyFileMappings(maps: String) -> [Mapping] {
        var out: [Mapping] = []
        for line in maps.split(separator: "\n", omittingEmptySubsequences: true) {
            let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count == 6 else { continue }
            let perms = fields[1]
            let path = fields[5].drop { $0 == " " }
            guard path.first == "/", perms.count == 4, !perms.contains("w") else { continue }
            let bounds = fields[0].split(separator: "-")
            guard bounds.count == 2, let start = UInt(bounds[0], radix: 16), let end = UInt(bounds[1], radix: 16),
                  start < end else { continue }
            out.append(Mapping(start: start, end: end, path: String(path)))
        }
        return out
    }

    /// Advises `MADV_PAGEOUT` on every read-only file mapping of this process. Blocking (it reads
    /// `/proc/self/maps` and the kernel reclaims synchronously): call it off the cooperative pool.
    public static func pageOut() -> Result {
        var result = Result(mappings: 0, bytes: 0, refused: 0)
        guard let maps = readProcFile("/proc/self/maps") else { return result }
        for m in readOnlyFileMappings(maps: maps) {
            let length = Int(m.end - m.start)
            if madvise(UnsafeMutableRawPointer(bitPattern: m.start), length, madvPageOut) == 0 {
                result.mappings += 1
                result.bytes += UInt64(length)
            } else {
                result.refused += 1
            }
        }
        return result
    }

    /// Resident bytes of this process (the second field of /proc/self/statm, in pages).
    public static func residentBytes() -> UInt64? {
        guard let statm = readProcFile("/proc/self/statm") else { return nil }
        let fields = statm.split(separator: " ")
        guard fields.count >= 2, let pages = UInt64(fields[1]) else { return nil }
        return pages * UInt64(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// Resident bytes of this process, split as the kernel counts them (`RssAnon`, `RssFile`, `RssShmem` of
    /// /proc/self/status).
    public static func resident() -> (anonymous: UInt64, file: UInt64)? {
        guard let status = readProcFile("/proc/self/status") else { return nil }
        var anon: UInt64?, file: UInt64?
        for line in status.split(separator: "\n") {
            let f = line.split(omittingEmptySubsequences: true) { $0 == " " || $0 == "\t" }
            guard f.count >= 2, let kib = UInt64(f[1]) else { continue }
            if f[0] == "RssAnon:" { anon = kib << 10 }
            if f[0] == "RssFile:" { file = kib << 10 }
        }
        guard let anon, let file else { return nil }
        return (anon, file)
    }

    /// A /proc file's text (their size is 0 to stat, so read until EOF), at most 4 MiB.
    static func readProcFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while bytes.count < 4 << 20 {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
