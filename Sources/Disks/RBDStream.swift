import Convert
import Glance
import ImageFormats
import RBD
import Synchronization
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
        let unit = sink.unit
        var runStart: Int?
        var pos = 0
        while pos < bytes.count {
            let end = min(pos + unit, bytes.count)
            let zero = isZero(UnsafeRawBufferPointer(rebasing: bytes[pos..<end]))
            if !zero && runStart == nil { runStart = pos }
            if zero, let s = runStart {
                try sink.write(EncodedRun(offset: offset + UInt64(s), data: UnsafeRawBufferPointer(rebasing: bytes[s..<pos])))
                runStart = nil
            }
            pos = end
        }
        if let s = runStart {
            try sink.write(EncodedRun(offset: offset + UInt64(s), data: UnsafeRawBufferPointer(rebasing: bytes[s..<bytes.count])))
        }
    }

    func isZero(_ b: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = b.count
        while i + 8 <= n {
            if b.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n {
            if b[i] != 0 { return false }
            i += 1
        }
        return true
    }
}

/// An RBD image as the inspector's storage: the same inspection every other path goes through, on what was
/// streamed into Ceph, before it is published.
final class RBDStorage: ImageStorage, @unchecked Sendable {
    let image: RBDImage
    let name: String
    let size: UInt64

    init(_ image: RBDImage) throws {
        self.image = image
        name = "rbd:\(image.io.pool)/\(image.name)"
        size = try image.stat().size
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
final class GrowingFile: DownloadSink, @unchecked Sendable {
    let path: String
    let size: UInt64
    private let fd: Int32
    private struct State { var written: UInt64 = 0; var failure: String?; var done = false }
    private let state = Mutex(State())

    init(path: String, size: UInt64) throws {
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0 { throw DiskError.io("cannot create '\(path)': \(String(cString: strerror(errno)))") }
        self.path = path
        self.size = size
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SinkError.io(operation: "write", path: path, errno: errno)
            }
            done += n
        }
        let end = offset + UInt64(bytes.count)
        state.withLock { $0.written = max($0.written, end) }
    }

    /// The download ended: readers waiting for bytes that will never come fail with `failure`.
    func finish(failure: String?) {
        state.withLock {
            $0.done = true
            $0.failure = failure
        }
    }

    /// Waits until `end` bytes have arrived.
    func wait(for end: UInt64) throws {
        while true {
            let s = state.withLock { $0 }
            if s.written >= end { return }
            if let f = s.failure { throw DiskError.io("the download stopped: \(f)") }
            if s.done { throw DiskError.io("the download ended at \(s.written) bytes, before byte \(end)") }
            usleep(2000)
        }
    }

    func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw ImageError.io(operation: "read", path: path, errno: errno)
            }
            if n == 0 { throw ImageError.pastEndOfFile(what: "data", offset: offset, length: UInt64(buffer.count), fileSize: size) }
            done += n
        }
    }

    func close() {
        Glibc.close(fd)
        unlink(path)
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
        try file.wait(for: offset + UInt64(buffer.count))
        try file.pread(into: buffer, at: offset)
    }
}
