#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Bytes readable at an offset: the layer under every format (a file today; an RBD image or a ranged
/// HTTP stream later). Reads are positioned, so one storage is safe to use from several threads.
public protocol ImageStorage: AnyObject, Sendable {
    /// A name for messages and for `qemu-img map`'s File column.
    var name: String { get }
    /// The size in bytes.
    var size: UInt64 { get }
    /// Fills `buffer` from `offset`. A read that would pass the end of the storage throws
    /// `ImageError.pastEndOfFile`: a pointer past the end is an error, never silent zeros.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws
    /// Whether the bytes at `offset` are stored (data) or a hole, and where that run ends.
    /// Storage that cannot tell reports everything as data.
    func allocation(at offset: UInt64) throws -> (isData: Bool, end: UInt64)
    /// Bytes actually allocated on the host (qemu-img's `actual-size`), if known.
    var allocatedBytes: UInt64? { get }
}

extension ImageStorage {
    public func allocation(at offset: UInt64) throws -> (isData: Bool, end: UInt64) { (true, size) }
    public var allocatedBytes: UInt64? { nil }

    /// Reads `count` bytes at `offset` into a new array, after checking the range against the size.
    public func readBytes(at offset: UInt64, count: Int, what: String) throws -> [UInt8] {
        try checkRange(offset: offset, length: UInt64(count), what: what)
        return try [UInt8](unsafeUninitializedCapacity: count) { buf, n in
            try read(into: UnsafeMutableRawBufferPointer(buf), at: offset, what: what)
            n = count
        }
    }

    /// Throws `pastEndOfFile` unless `offset ..< offset+length` lies inside the storage.
    public func checkRange(offset: UInt64, length: UInt64, what: String) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > size {
            throw ImageError.pastEndOfFile(what: what, offset: offset, length: length, fileSize: size)
        }
    }
}

/// A read-only file opened once; reads use pread and are thread-safe.
public final class FileStorage: ImageStorage {
    public let path: String
    public let name: String
    public let size: UInt64
    private let fd: Int32

    public init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw ImageError.io(operation: "open", path: path, errno: errno) }
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = errno
            close(fd)
            throw ImageError.io(operation: "stat", path: path, errno: e)
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            close(fd)
            throw ImageError.io(operation: "open", path: path, errno: EISDIR)
        }
        self.fd = fd
        self.path = path
        self.name = path
        self.size = UInt64(st.st_size)
    }

    deinit { close(fd) }

    /// The open descriptor, for calls that act on the file as a whole (sharing its extents with an output).
    /// It stays owned by this storage.
    public var descriptor: Int32 { fd }

    public var allocatedBytes: UInt64? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        try checkRange(offset: offset, length: UInt64(buffer.count), what: what)
        try Self.preadAll(fd, into: buffer, at: offset, path: path, what: what, size: size)
    }

    /// Fills `buffer` from `fd` at `offset`, retrying short reads and EINTR; end of file is `pastEndOfFile`
    /// (the file shrank under us, or the bytes are not there).
    public static func preadAll(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, path: String,
                                what: String, size: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw ImageError.io(operation: "read", path: path, errno: errno)
            }
            if n == 0 {
                throw ImageError.pastEndOfFile(what: what, offset: offset, length: UInt64(buffer.count), fileSize: size)
            }
            done += n
        }
    }

    /// SEEK_DATA / SEEK_HOLE (Linux values; Glibc hides the names without _GNU_SOURCE).
    private static let seekData: Int32 = 3
    private static let seekHole: Int32 = 4

    public func allocation(at offset: UInt64) throws -> (isData: Bool, end: UInt64) {
        guard offset < size else { return (false, size) }
        let data = lseek(fd, off_t(offset), Self.seekData)
        if data < 0 {
            if errno == ENXIO { return (false, size) }  // only a hole up to the end
            if errno == EINVAL { return (true, size) }  // file system without SEEK_DATA: all data
            throw ImageError.io(operation: "lseek(SEEK_DATA)", path: path, errno: errno)
        }
        if UInt64(data) > offset { return (false, min(UInt64(data), size)) }
        let hole = lseek(fd, off_t(offset), Self.seekHole)
        if hole < 0 { throw ImageError.io(operation: "lseek(SEEK_HOLE)", path: path, errno: errno) }
        return (true, min(UInt64(hole), size))
    }
}

/// Bytes in memory: for tests and fuzzing.
public final class MemoryStorage: ImageStorage {
    public let name: String
    public let bytes: [UInt8]
    public var size: UInt64 { UInt64(bytes.count) }

    public init(_ bytes: [UInt8], name: String = "memory") {
        self.bytes = bytes
        self.name = name
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        try checkRange(offset: offset, length: UInt64(buffer.count), what: what)
        bytes.withUnsafeBytes { src in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<Int(offset) + buffer.count]))
        }
    }
}
