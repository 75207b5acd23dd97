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
        try Converter.writeWindow(bytes, at: offset, to: sink)
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
    let size: UInt64
    /// Written as every download is (a temporary name start-up removes), not fsynced: it never outlives us.
    private let out: OutputFile
    private let readFD: Int32
    private struct State { var written: UInt64 = 0; var failure: String?; var done = false }
    private let state = Mutex(State())

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
        self.size = size
    }

    var path: String { out.currentPath }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try out.pwriteAll(bytes, at: offset)
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

    func pread(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        try FileStorage.preadAll(readFD, into: buffer, at: offset, path: path, what: what, size: size)
    }

    func close() {
        Glibc.close(readFD)
        out.discard()
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
        try file.pread(into: buffer, at: offset, what: what)
    }
}
