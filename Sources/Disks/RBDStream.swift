import SystemIO
import Convert
import Glance
import ImageFormats
import RBD
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A raw image streamed from Glance straight into an RBD image: the download's blocks are cut into 4 KiB units,
/// zero units are skipped (a new image reads as zeros) and the rest goes to an `RBDSink`. Nothing touches local
/// disk. The caller inspects the result (`RBDStorage`) and checks the hashes before it publishes anything.
final class RBDStreamSink: DownloadSink, @unchecked Sendable {
    let sink: RBDSink
    let stop: @Sendable () -> Bool

    init(_ sink: RBDSink, stop: @escaping @Sendable () -> Bool) {
        self.sink = sink
        self.stop = stop
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if stop() { throw SinkError.cancelled }
        try Converter.writeWindow(bytes, at: offset, to: sink)
    }
}

/// An RBD image as the inspector's storage: the same inspection every other path goes through, on what was
/// streamed into Ceph, before it is published.
final class RBDStorage: ImageStorage, @unchecked Sendable {
    let image: RBDImage
    let name: String
    let size: UInt64

    convenience init(_ image: RBDImage) throws {
        try self.init(image, size: try image.stat().size)
    }

    /// The first `size` bytes of the image (a Cinder volume holds the image file at its start).
    init(_ image: RBDImage, size: UInt64) throws {
        self.image = image
        name = "rbd:\(image.io.pool)/\(image.name)"
        let whole = try image.stat().size
        guard size <= whole else {
            throw ImageError.pastEndOfFile(what: "image file", offset: 0, length: size, fileSize: whole)
        }
        self.size = size
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        guard offset <= size, UInt64(buffer.count) <= size - offset else {
            throw ImageError.pastEndOfFile(what: what, offset: offset, length: UInt64(buffer.count), fileSize: size)
        }
        var done = 0
        while done < buffer.count {
            let n = try image.read(at: offset + UInt64(done), into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]))
            guard n > 0 else { throw ImageError.pastEndOfFile(what: what, offset: offset, length: UInt64(buffer.count), fileSize: size) }
            done += n
        }
    }
}

/// A file that is still being downloaded, readable while it grows: the converter follows the download instead
/// of waiting for it. Reads of bytes not yet written wait; a failed download fails them. The file is removed on
/// `close`.
///
/// The newest bytes also stay in a RAM window (`windowSize`), where the converter, which follows close behind,
/// reads them; the file is written around the page cache (O_DIRECT, in aligned chunks from the window) and read
/// only for what fell out of the window. On this kind of machine filling the page cache is what costs: ~3 s of
/// system time per GiB of page cache touched, against ~0.15 s per GiB for direct writes (measured; see
/// BENCHMARKS.md). The download is held back while it runs more than `lead` bytes ahead of the furthest read,
/// so a slow sink keeps the reads in the window; once the converter is done (`stopFollowing`) it runs free.
/// On a file system without O_DIRECT (tmpfs) the chunks go through the page cache as before.
final class GrowingFile: DownloadSink, @unchecked Sendable {
    let size: UInt64
    static let windowSize = 12 << 20
    static let chunk = 4 << 20
    static let alignment = 4096
    let lead: UInt64 = UInt64(GrowingFile.windowSize / 2)

    /// Written as every download is (a temporary name start-up removes), not fsynced: it never outlives us.
    private let out: OutputFile
    private var readFD: Int32
    /// Our second descriptor on the same file, opened O_DIRECT; -1 once direct writes are unavailable.
    private var directFD: Int32 = -1
    private let window: UnsafeMutableRawBufferPointer
    private let tail: UnsafeMutableRawBufferPointer

    /// Guarded by `cond`: the window holds bytes [written - windowSize, written); everything below `flushed`
    /// is in the file.
    private let cond = NSCondition()
    private var written: UInt64 = 0
    private var furthestRead: UInt64 = 0
    private var following = true
    private var failure: String?
    private var done = false
    /// Only the writer touches it.
    private var flushed: UInt64 = 0

    /// A temporary file next to `path` (`.<name>.imgconv-…`).
    init(path: String, size: UInt64) throws {
        out = OutputFile(path: path)
        out.durable = false
        try out.create()
        readFD = open(out.currentPath, O_RDONLY | O_CLOEXEC)
        if readFD < 0 {
            let e = errno
            out.discard()
            throw SinkError.io(operation: "open", path: path, errno: e)
        }
        directFD = open(out.currentPath, O_WRONLY | O_DIRECT | O_CLOEXEC)
        window = .allocate(byteCount: Self.windowSize, alignment: Self.alignment)
        tail = .allocate(byteCount: Self.alignment, alignment: Self.alignment)
        self.size = size
    }

    var path: String { out.currentPath }

    /// Bytes the download has delivered so far.
    var received: UInt64 {
        cond.lock()
        defer { cond.unlock() }
        return written
    }

    /// Downloads arrive in order.
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        cond.lock()
        let at = written
        cond.unlock()
        guard offset == at else { throw DiskError.io("download block at \(offset), expected \(at): the stream file takes bytes in order") }
        var done = 0
        while done < bytes.count {
            let n = min(bytes.count - done, Self.chunk)
            let start = written
            // Never overwrite what is not in the file yet.
            if start + UInt64(n) - flushed > UInt64(Self.windowSize) { try flush(final: false) }
            cond.lock()
            while following && failure == nil && start > furthestRead + lead { cond.wait() }
            let from = done
            inWindow(start, n) { slot, at, k in slot.copyMemory(from: bytes.baseAddress! + from + at, byteCount: k) }
            written = start + UInt64(n)
            cond.broadcast()
            cond.unlock()
            done += n
            if written - flushed >= UInt64(Self.chunk) { try flush(final: false) }
        }
    }

    /// Calls `body` with each contiguous piece of the window that holds `[offset, offset + count)`: the piece,
    /// where it starts within the range, and its length.
    private func inWindow(_ offset: UInt64, _ count: Int, _ body: (UnsafeMutableRawPointer, Int, Int) -> Void) {
        var p = Int(offset % UInt64(Self.windowSize)), at = 0
        while at < count {
            let k = min(count - at, Self.windowSize - p)
            body(window.baseAddress! + p, at, k)
            p = (p + k) % Self.windowSize
            at += k
        }
    }

    /// Writes the window's aligned part out to the file; with `final`, the unaligned tail too.
    private func flush(final: Bool) throws {
        let end = written & ~UInt64(Self.alignment - 1)
        while flushed < end {
            let p = Int(flushed % UInt64(Self.windowSize))
            let n = Int(min(end - flushed, UInt64(Self.windowSize - p)))
            try store(UnsafeRawBufferPointer(start: window.baseAddress! + p, count: n), at: flushed)
            flushed += UInt64(n)
        }
        guard final, written > flushed else { return }
        // Less than one block, so one piece of the window. Direct writes go in whole blocks: pad the last one,
        // then cut the file back to its size.
        let n = Int(written - flushed)
        let last = UnsafeRawBufferPointer(start: window.baseAddress! + Int(flushed % UInt64(Self.windowSize)), count: n)
        if directFD >= 0 {
            tail.initializeMemory(as: UInt8.self, repeating: 0)
            tail.baseAddress!.copyMemory(from: last.baseAddress!, byteCount: n)
            try store(UnsafeRawBufferPointer(tail), at: flushed)
        } else {
            try store(last, at: flushed)
        }
        try out.truncate(written)
        flushed = written
    }

    private func store(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while directFD >= 0 && done < bytes.count {
            let r = pwrite(directFD, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if r < 0 {
                if errno == EINTR { continue }
                guard errno == EINVAL else { throw SinkError.io(operation: "write", path: path, errno: errno) }
                Glibc.close(directFD)
                directFD = -1
                break
            }
            done += r
        }
        if done < bytes.count {
            try out.pwriteAll(UnsafeRawBufferPointer(rebasing: bytes[done...]), at: offset + UInt64(done))
        }
    }

    /// The download ended. On success the rest of the window goes to the file; readers waiting for bytes that
    /// will never come fail with the failure.
    func finish(failure: String?) throws {
        var failure = failure
        if failure == nil {
            do { try flush(final: true) } catch {
                failure = "\(error)"
                markEnded(failure)
                throw error
            }
        }
        markEnded(failure)
    }

    private func markEnded(_ f: String?) {
        cond.lock()
        done = true
        failure = f
        cond.broadcast()
        cond.unlock()
    }

    /// The converter is done with the file: the download no longer waits for it.
    func stopFollowing() {
        cond.lock()
        following = false
        cond.broadcast()
        cond.unlock()
    }

    /// Reads `[offset, offset + count)` once it has arrived: from the window while it is there, else from the file.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        let end = offset + UInt64(buffer.count)
        cond.lock()
        furthestRead = max(furthestRead, end)
        cond.broadcast()
        while written < end {
            if let f = failure { cond.unlock(); throw DiskError.io("the download stopped: \(f)") }
            if done { let w = written; cond.unlock(); throw DiskError.io("the download ended at \(w) bytes, before byte \(end)") }
            cond.wait()
        }
        // Whatever lies below the window is in the file already.
        let low = written > UInt64(Self.windowSize) ? written - UInt64(Self.windowSize) : 0
        let fromFile = offset < low ? Int(min(low, end) - offset) : 0
        inWindow(offset + UInt64(fromFile), buffer.count - fromFile) { slot, at, k in
            (buffer.baseAddress! + fromFile + at).copyMemory(from: slot, byteCount: k)
        }
        cond.unlock()
        if fromFile > 0 {
            try FileStorage.preadAll(readFD, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<fromFile]), at: offset,
                                     path: path, what: what, size: size)
        }
    }

    /// Once every reader is done. Closing twice is harmless: each descriptor is closed once.
    func close() {
        if readFD >= 0 { Glibc.close(readFD); readFD = -1 }
        if directFD >= 0 { Glibc.close(directFD); directFD = -1 }
        out.discard()
    }

    deinit {
        window.deallocate()
        tail.deallocate()
    }
}

/// The growing file as the formats library's storage, sized as Glance says the image is (the download checks
/// that size and the hashes before anything is published).
final class GrowingFileStorage: ImageStorage, @unchecked Sendable {
    let file: GrowingFile
    var name: String { file.path }
    var size: UInt64 { file.size }

    init(_ file: GrowingFile) { self.file = file }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        guard offset <= size, UInt64(buffer.count) <= size - offset else {
            throw ImageError.pastEndOfFile(what: what, offset: offset, length: UInt64(buffer.count), fileSize: size)
        }
        try file.read(into: buffer, at: offset, what: what)
    }
}
