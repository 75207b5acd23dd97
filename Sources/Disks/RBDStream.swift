import Convert
import Glance
import ImageFormats
import RBD
import Synchronization

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
