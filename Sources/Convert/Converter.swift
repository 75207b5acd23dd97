import ImageFormats
import Logging
import Synchronization

/// Conversion settings, validated once before any work starts.
public struct ConvertOptions: Sendable {
    /// Zero-detection granularity (qemu-img's -S): aligned runs of this many zero bytes inside data are not
    /// written. 0 turns detection off.
    public var zeroGranularity: Int = 4096
    /// Bytes read per step. 1 MiB beat 4 MiB for sparse copies on this hardware (SWIFT_STACK.md measurements).
    public var chunkSize: Int = 1 << 20

    public init() {}

    public func validated() throws -> ConvertOptions {
        guard zeroGranularity == 0 || (zeroGranularity >= 512 && zeroGranularity % 512 == 0) else {
            throw SinkError.unsupportedOutput("-S must be 0 or a multiple of 512 bytes, got \(zeroGranularity)")
        }
        guard chunkSize >= 64 << 10, chunkSize <= 64 << 20 else {
            throw SinkError.unsupportedOutput("chunk size must be 64 KiB to 64 MiB, got \(chunkSize)")
        }
        var o = self
        if zeroGranularity > 0 { o.chunkSize = max(chunkSize / zeroGranularity, 1) * zeroGranularity }
        return o
    }
}

/// What a conversion did.
public struct ConvertStats: Sendable, Equatable {
    public var virtualSize: UInt64 = 0
    /// Bytes read from data extents.
    public var bytesRead: UInt64 = 0
    /// Bytes written to the sink.
    public var bytesWritten: UInt64 = 0
    /// Bytes of data extents found to be zero and not written.
    public var zeroBytesSkipped: UInt64 = 0
    /// Bytes never read because the map says they are zero or unallocated.
    public var holeBytes: UInt64 = 0
}

/// Copies an image into a sink by walking its extents: only data is read, only non-zero data is written.
/// It knows nothing about formats; the image answers "what is here?" and the sink takes bytes.
public struct Converter: Sendable {
    public let options: ConvertOptions
    /// Set from any thread (a signal handler) to stop at the next chunk.
    public let cancel: @Sendable () -> Bool
    /// Called after each chunk with (bytes processed, virtual size).
    public let progress: (@Sendable (UInt64, UInt64) -> Void)?
    let logger = Logger(label: "imgconv.convert")

    public init(options: ConvertOptions = ConvertOptions(), cancel: @escaping @Sendable () -> Bool = { false },
                progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) throws {
        self.options = try options.validated()
        self.cancel = cancel
        self.progress = progress
    }

    /// Converts `image` into `sink`. On any error or cancellation the sink is aborted, so nothing partial remains.
    @discardableResult
    public func convert(_ image: any DiskImage, to sink: any ImageSink) throws -> ConvertStats {
        do {
            try sink.begin(virtualSize: image.virtualSize)
            let stats = try copy(image, to: sink)
            try sink.finish()
            logger.debug("converted", metadata: ["read": "\(stats.bytesRead)", "written": "\(stats.bytesWritten)"])
            return stats
        } catch {
            sink.abort()
            throw error
        }
    }

    func copy(_ image: any DiskImage, to sink: any ImageSink) throws -> ConvertStats {
        var stats = ConvertStats(virtualSize: image.virtualSize)
        let chunk = options.chunkSize
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var pos: UInt64 = 0
        let size = image.virtualSize
        while pos < size {
            if cancel() { throw SinkError.cancelled }
            var ext = try image.extent(at: pos, maxLength: UInt64(chunk))
            if ext.readsAsZero && ext.length == UInt64(chunk) {
                // A long hole: skip all of it in one step (a 1 TiB empty qcow2 is ~2048 L1 entries, not 1 Mi chunks).
                ext = try image.extent(at: pos)
            }
            if ext.readsAsZero {
                stats.holeBytes += ext.length
            } else {
                let n = Int(ext.length)
                let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                try image.read(into: data, at: ext.start)
                stats.bytesRead += UInt64(n)
                try writeNonZero(UnsafeRawBufferPointer(data), at: ext.start, to: sink, stats: &stats)
            }
            pos = ext.end
            progress?(pos, size)
        }
        return stats
    }

    /// Writes the parts of `data` that are not aligned zero runs of the detection granularity.
    func writeNonZero(_ data: UnsafeRawBufferPointer, at offset: UInt64, to sink: any ImageSink,
                      stats: inout ConvertStats) throws {
        let g = options.zeroGranularity
        guard g > 0 else {
            try sink.write(data, at: offset)
            stats.bytesWritten += UInt64(data.count)
            return
        }
        var i = 0
        var runStart = -1
        // Granules are aligned to the virtual disk, so a run boundary falls where qemu's would.
        while i < data.count {
            let boundary = ((offset + UInt64(i)) / UInt64(g) + 1) * UInt64(g)
            let end = min(data.count, Int(boundary - offset))
            let zero = ZeroDetector.isZero(UnsafeRawBufferPointer(rebasing: data[i..<end]))
            if zero {
                if runStart >= 0 {
                    try sink.write(UnsafeRawBufferPointer(rebasing: data[runStart..<i]), at: offset + UInt64(runStart))
                    stats.bytesWritten += UInt64(i - runStart)
                    runStart = -1
                }
                stats.zeroBytesSkipped += UInt64(end - i)
            } else if runStart < 0 {
                runStart = i
            }
            i = end
        }
        if runStart >= 0 {
            try sink.write(UnsafeRawBufferPointer(rebasing: data[runStart..<data.count]), at: offset + UInt64(runStart))
            stats.bytesWritten += UInt64(data.count - runStart)
        }
    }
}

/// Word-at-a-time zero test: ~10 GB/s against ~1.7 GB/s for a byte loop (SWIFT_STACK.md).
public enum ZeroDetector {
    @inline(__always)
    public static func isZero(_ b: UnsafeRawBufferPointer) -> Bool {
        guard let base = b.baseAddress else { return true }
        let n = b.count
        var i = 0
        // Head bytes until 8-byte alignment.
        while i < n && (Int(bitPattern: base + i) & 7) != 0 {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        while i + 32 <= n {
            let a = base.load(fromByteOffset: i, as: UInt64.self) | base.load(fromByteOffset: i + 8, as: UInt64.self)
                | base.load(fromByteOffset: i + 16, as: UInt64.self) | base.load(fromByteOffset: i + 24, as: UInt64.self)
            if a != 0 { return false }
            i += 32
        }
        while i < n {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }
}
