import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// Where converted bytes go. The converter calls `write` only with data (never zeros, never holes) and
/// `finish` once at the end; `abort` removes everything the sink created.
public protocol ImageSink: AnyObject {
    /// Prepares for an image of `virtualSize` bytes.
    func begin(virtualSize: UInt64) throws
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes the result durable and visible (fsync, rename).
    func finish() throws
    /// Removes any partial output. Never throws: it runs on the error path.
    func abort()
}

/// Errors of writing an output.
public enum SinkError: Error, CustomStringConvertible {
    case io(operation: String, path: String, errno: Int32)
    case unsupportedOutput(String)
    case cancelled

    public var description: String {
        switch self {
        case let .io(op, path, err):
            var hint = ""
            if err == ENOSPC || err == EDQUOT { hint = ": the target file system is full; free space or choose another target" }
            return "\(op) '\(path)' failed: \(errnoName(err)) (\(String(cString: strerror(err))))\(hint)"
        case let .unsupportedOutput(s): return s
        case .cancelled: return "interrupted; no output was left behind"
        }
    }
}

/// A sparse raw file written under a temporary name in the target's directory and renamed over the target
/// at the end, so a reader never sees a partial file. Holes are never written: the file is sized with
/// ftruncate and only data is written into it.
public final class RawFileSink: ImageSink {
    public let path: String
    public private(set) var temporaryPath: String?
    private var fd: Int32 = -1
    private let mode: mode_t

    public init(path: String, mode: mode_t = 0o644) {
        self.path = path
        self.mode = mode
    }

    public func begin(virtualSize: UInt64) throws {
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let base = path.lastIndex(of: "/").map { String(path[path.index(after: $0)...]) } ?? path
        for attempt in 0..<100 {
            let tmp = "\(dir.isEmpty ? "/" : dir)/.\(base).imgconv-\(getpid())-\(attempt)"
            let f = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
            if f >= 0 {
                fd = f
                temporaryPath = tmp
                break
            }
            if errno != EEXIST { throw SinkError.io(operation: "create", path: tmp, errno: errno) }
        }
        guard fd >= 0 else { throw SinkError.io(operation: "create temporary for", path: path, errno: EEXIST) }
        if ftruncate(fd, off_t(virtualSize)) != 0 {
            let e = errno
            abort()
            throw SinkError.io(operation: "truncate", path: temporaryPath ?? path, errno: e)
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SinkError.io(operation: "write", path: temporaryPath ?? path, errno: errno)
            }
            done += n
        }
    }

    public func finish() throws {
        guard let tmp = temporaryPath else { return }
        if fsync(fd) != 0 { throw SinkError.io(operation: "fsync", path: tmp, errno: errno) }
        close(fd)
        fd = -1
        if rename(tmp, path) != 0 { throw SinkError.io(operation: "rename to '\(path)'", path: tmp, errno: errno) }
        temporaryPath = nil
        // Make the rename itself durable.
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let dfd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); close(dfd) }
    }

    public func abort() {
        if fd >= 0 { close(fd); fd = -1 }
        if let tmp = temporaryPath { unlink(tmp); temporaryPath = nil }
    }

    deinit { abort() }
}
