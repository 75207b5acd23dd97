#if canImport(Glibc)
import Glibc
#endif

/// An output file written under a temporary name in the target's directory, fsynced and renamed over the
/// target at the end, so nobody ever sees a partial image. With `inPlace` (`-n`) the existing file is written.
///
/// The file gets exactly `mode` whatever the process's umask (fchmod after create): cache files are read by
/// qemu as another user, and the agent never changes the umask after start-up.
///
/// One owner at a time: it may be handed from thread to thread (the executor's), never used from two at once.
public final class OutputFile: @unchecked Sendable {
    public let path: String
    public private(set) var temporaryPath: String?
    public private(set) var fd: Int32 = -1
    let inPlace: Bool
    /// Permission bits of the new file.
    public let mode: mode_t

    public init(path: String, inPlace: Bool = false, mode: mode_t = 0o644) {
        self.path = path
        self.inPlace = inPlace
        self.mode = mode
    }

    var directory: String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let d = String(path[..<slash])
        return d.isEmpty ? "/" : d
    }

    public func create() throws {
        if inPlace {
            fd = open(path, O_WRONLY | O_CLOEXEC)
            if fd < 0 { throw FileError("open", path: path, errno: errno) }
            if direct { openDirect() }
            return
        }
        let base = path.lastIndex(of: "/").map { String(path[path.index(after: $0)...]) } ?? path
        for attempt in 0..<1000 {
            let tmp = "\(directory)/.\(base).imgconv-\(getpid())-\(attempt)"
            let f = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
            if f >= 0 {
                fd = f
                temporaryPath = tmp
                // The umask may have taken bits away: the mode is set, not requested.
                if fchmod(f, mode) != 0 {
                    let e = errno
                    discard()
                    throw FileError("chmod", path: tmp, errno: e)
                }
                if direct { openDirect() }
                return
            }
            if errno != EEXIST { throw FileError("create", path: tmp, errno: errno) }
        }
        throw FileError("create a temporary file for", path: path, errno: EEXIST)
    }

    public var currentPath: String { temporaryPath ?? path }

    /// Bytes written, and the range they fell in, since write-back was last started.
    private var unflushed = 0
    private var dirtyLow = UInt64.max, dirtyHigh: UInt64 = 0
    /// Skip the fsync before the rename (`-t unsafe`, qemu-img convert's default): the rename stays atomic,
    /// but after a power cut the file may hold stale blocks.
    public var durable = true
    /// Start write-back every 16 MiB so the final fsync has little left to do and the disk works while we
    /// read (measured: the fsync of 600 MB written in one go cost more than the whole copy).
    static let writebackInterval = 16 << 20

    /// Writes all of `bytes` at `offset`; they are on their way to the disk when this returns.
    public func pwriteAll(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if try place(bytes, at: offset) { try drain() }
    }

    /// Writes all of `bytes` at `offset`, but a large aligned part may still be in flight when this returns (direct
    /// I/O, several writes at once): the caller keeps `bytes` valid and unchanged until `drain()` returns.
    public func submit(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        _ = try place(bytes, at: offset)
    }

    /// Waits for every write `submit` left in flight; throws the first that failed.
    public func drain() throws {
        try directWriter?.drain()
    }

    // MARK: O_DIRECT

    /// Write large pieces with O_DIRECT (set before `create`), several at once (`DirectWriter`): the data goes
    /// from the caller's buffers to the device, not through the page cache. Metadata, small writes and the
    /// unaligned edges of a piece still go through the page cache; the fsync before the rename covers both. Where
    /// the file system refuses O_DIRECT (tmpfs, some network file systems) everything is buffered, and
    /// `directRefusal` says why.
    public var direct = false
    /// Why writes are not direct although `direct` was asked for (nil when they are, or it was not asked for).
    public private(set) var directRefusal: String?
    /// True while large writes go to the device directly.
    public var isDirect: Bool { directWriter != nil }
    private var directWriter: DirectWriter?
    /// For a piece whose buffer is not aligned: copied here, `bounceSize` at a time.
    private var bounce: UnsafeMutableRawBufferPointer?
    static let bounceSize = 1 << 20
    /// Smaller pieces stay buffered: a direct write waits for the device, which costs more than a copy.
    static let directMinimum = 64 << 10

    private func openDirect() {
        switch DirectWriter.open(path: currentPath, bufferedFD: fd) {
        case .success(let w): directWriter = w
        case .failure(let r): directRefusal = r.reason
        }
    }

    /// Writes `bytes`: the aligned middle of a large piece to the device directly, the rest through the page
    /// cache. Returns true when direct writes were queued.
    private func place(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws -> Bool {
        guard let w = directWriter, bytes.count >= Self.directMinimum else {
            try writeBuffered(bytes, at: offset)
            return false
        }
        if w.refused {
            // An I/O thread found the file system refusing direct writes: the rest of the file is buffered.
            directWriter = nil
            directRefusal = "O_DIRECT write refused: EINVAL"
            try w.drain()
            try writeBuffered(bytes, at: offset)
            return false
        }
        let a = UInt64(w.offsetAlignment)
        let end = offset + UInt64(bytes.count)
        let midStart = (offset + a - 1) / a * a
        let midEnd = end / a * a
        guard midEnd > midStart, Int(midEnd - midStart) >= Self.directMinimum else {
            try writeBuffered(bytes, at: offset)
            return false
        }
        let head = Int(midStart - offset), midLength = Int(midEnd - midStart)
        let middle = UnsafeRawBufferPointer(rebasing: bytes[head..<(head + midLength)])
        if head > 0 { try writeBuffered(UnsafeRawBufferPointer(rebasing: bytes[0..<head]), at: offset) }
        if w.takes(middle, at: midStart) {
            try w.submit(middle, at: midStart)
        } else {
            // The caller's buffer is not aligned: through the bounce buffer, one piece at a time.
            let size = Self.bounceSize
            if bounce == nil { bounce = .allocate(byteCount: size, alignment: max(w.memoryAlignment, 4096)) }
            try w.drain()
            var done = 0
            while done < midLength {
                let n = min(size, midLength - done)
                bounce!.copyMemory(from: UnsafeRawBufferPointer(rebasing: middle[done..<(done + n)]))
                try w.submit(UnsafeRawBufferPointer(rebasing: bounce![0..<n]), at: midStart + UInt64(done))
                try w.drain()
                done += n
            }
        }
        if midEnd < end {
            try writeBuffered(UnsafeRawBufferPointer(rebasing: bytes[(head + midLength)...]), at: midEnd)
        }
        return true
    }

    // MARK: Buffered

    private func writeBuffered(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        unflushed += bytes.count
        dirtyLow = min(dirtyLow, offset)
        dirtyHigh = max(dirtyHigh, offset + UInt64(bytes.count))
        if durable && unflushed >= Self.writebackInterval {
            // SYNC_FILE_RANGE_WRITE: start write-back of what we wrote since last time; do not wait.
            _ = sync_file_range(fd, off_t(dirtyLow), off_t(dirtyHigh - dirtyLow), 2)
            unflushed = 0
            dirtyLow = .max
            dirtyHigh = 0
        }
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw FileError("write", path: currentPath, errno: errno)
            }
            done += n
        }
    }

    public func pwriteAll(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try pwriteAll($0, at: offset) }
    }

    public func truncate(_ size: UInt64) throws {
        if ftruncate(fd, off_t(size)) != 0 { throw FileError("truncate", path: currentPath, errno: errno) }
    }

    public func allocate(_ offset: UInt64, _ length: UInt64) throws {
        guard length > 0 else { return }
        let r = posix_fallocate(fd, off_t(offset), off_t(length))
        if r != 0 { throw FileError("fallocate", path: currentPath, errno: r) }
    }

    /// fsync, rename into place, fsync the directory.
    public func commit() throws {
        guard fd >= 0 else { return }
        try drain()
        if durable && fsync(fd) != 0 { throw FileError("fsync", path: currentPath, errno: errno) }
        closeDirect()
        close(fd)
        fd = -1
        guard let tmp = temporaryPath else { return }
        if rename(tmp, path) != 0 { throw FileError("rename to '\(path)'", path: tmp, errno: errno) }
        temporaryPath = nil
        guard durable else { return }
        let dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); close(dfd) }
    }

    /// Closes the descriptor (once: a second close could hit a descriptor another thread has opened since) and
    /// removes the temporary file, if any.
    public func discard() {
        closeDirect()
        if fd >= 0 { close(fd); fd = -1 }
        if let tmp = temporaryPath { unlink(tmp); temporaryPath = nil }
    }

    /// Waits for writes in flight (their threads use the descriptors), then closes the direct descriptor.
    private func closeDirect() {
        if let w = directWriter {
            try? w.drain()
            directWriter = nil
        }
        bounce?.deallocate()
        bounce = nil
    }

    deinit { discard() }
}

