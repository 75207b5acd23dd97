import SystemIO
import Convert
import ImageFormats
import RBD
#if canImport(Glibc)
import Glibc
#endif

/// The converter's output into a new RBD image: only the data runs the converter hands it are written (a new
/// image reads as zeros everywhere else, so zero runs are never sent to Ceph). Contiguous runs are gathered into
/// writes of up to one object, and several writes are in flight at once; memory is bounded by
/// `maxInFlight x objectSize` whatever the image size.
///
/// One caller at a time (it may hand the sink from one thread to the next, never share it).
/// `finish` flushes and closes; it does not snapshot or rename: the base builder does that once it knows it
/// still holds the lease. `abort` removes the image.
public final class RBDSink: ImageSink, @unchecked Sendable {
    public let io: IOContext
    public let name: String
    public let unit: Int
    let order: Int
    let maxInFlight: Int
    private var image: RBDImage?
    private var created = false
    private var pending: UnsafeMutableRawBufferPointer
    private var pendingOffset: UInt64 = 0
    private var pendingCount = 0
    private var inFlight: [(Completion, UnsafeMutableRawBufferPointer)] = []
    private var spare: [UnsafeMutableRawBufferPointer] = []
    public private(set) var bytesWritten: UInt64 = 0
    public private(set) var writes = 0

    /// `unit` is the zero-detection granule (4 KiB, like qemu-img's -S and `rbd import --sparse-size`).
    public init(io: IOContext, name: String, order: Int = 22, unit: Int = 4096, maxInFlight: Int = 4) {
        self.io = io
        self.name = name
        self.order = order
        self.unit = unit
        self.maxInFlight = maxInFlight
        pending = .allocate(byteCount: 1 << order, alignment: 4096)
    }

    deinit {
        for (c, b) in inFlight { _ = try? c.wait(); b.deallocate() }
        for b in spare { b.deallocate() }
        pending.deallocate()
    }

    var objectSize: Int { 1 << order }

    public func begin(virtualSize: UInt64) throws {
        try io.createImage(name, size: virtualSize, order: order)
        created = true
        image = try io.openImage(name)
    }

    public func write(_ run: EncodedRun) throws {
        var pos = 0
        while pos < run.data.count {
            let offset = run.offset + UInt64(pos)
            if pendingCount > 0 && pendingOffset + UInt64(pendingCount) != offset { try submit() }
            if pendingCount == 0 { pendingOffset = offset }
            // Never cross an object boundary: one write, one object.
            let objectEnd = (pendingOffset / UInt64(objectSize) + 1) * UInt64(objectSize)
            let room = Int(objectEnd - (pendingOffset + UInt64(pendingCount)))
            let n = min(room, run.data.count - pos)
            (pending.baseAddress! + pendingCount).copyMemory(from: run.data.baseAddress! + pos, byteCount: n)
            pendingCount += n
            pos += n
            if pendingCount == objectSize || n == room { try submit() }
        }
    }

    private func submit() throws {
        guard pendingCount > 0, let image else { return }
        let buffer = pending
        let c = try image.aioWrite(UnsafeRawBufferPointer(rebasing: buffer[0..<pendingCount]), at: pendingOffset)
        inFlight.append((c, buffer))
        bytesWritten += UInt64(pendingCount)
        writes += 1
        pendingCount = 0
        pending = spare.popLast() ?? .allocate(byteCount: objectSize, alignment: 4096)
        while inFlight.count >= maxInFlight { try waitOldest() }
    }

    private func waitOldest() throws {
        let (c, b) = inFlight.removeFirst()
        defer { spare.append(b) }
        try c.wait()
    }

    public func finish() throws {
        try submit()
        while !inFlight.isEmpty { try waitOldest() }
        try image?.flush()
        image?.close()
        image = nil
    }

    public func abort() {
        while !inFlight.isEmpty { try? waitOldest() }
        image?.close()
        image = nil
        if created { try? io.removeImage(name) }
        created = false
    }
}
