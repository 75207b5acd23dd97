/// How a run of the virtual disk reads.
public enum ExtentStatus: String, Sendable, Equatable {
    /// Bytes stored in the image (possibly compressed).
    case data
    /// Recorded in the image as reading zero (a zero cluster, a discarded block, a hole in a raw file).
    case zero
    /// Not recorded at all. imgconv never follows a backing file, so these bytes read as zero too.
    case unallocated
}

/// A run of the virtual disk with one allocation status: the answer to "what is at this offset?".
public struct Extent: Sendable, Equatable, CustomStringConvertible {
    public var start: UInt64
    public var length: UInt64
    public var status: ExtentStatus
    /// Where the first byte sits in `file`, when it sits there as is (qemu-img map's `offset`).
    public var hostOffset: UInt64?
    /// The bytes are compressed in the image (no host offset then).
    public var compressed: Bool
    /// Index into `DiskImage.files` of the file holding the bytes.
    public var file: Int

    public init(start: UInt64, length: UInt64, status: ExtentStatus, hostOffset: UInt64? = nil,
                compressed: Bool = false, file: Int = 0) {
        self.start = start
        self.length = length
        self.status = status
        self.hostOffset = hostOffset
        self.compressed = compressed
        self.file = file
    }

    public var end: UInt64 { start + length }
    /// Reads as zero without looking at any byte.
    public var readsAsZero: Bool { status != .data }

    public var description: String {
        "[\(start), +\(length)) \(status.rawValue)\(compressed ? " compressed" : "")"
            + (hostOffset.map { " @\($0)" } ?? "")
    }
}

/// A compressed cluster or grain: where its bytes are and how long it is once decompressed.
public struct CompressedBlock: Sendable, Hashable {
    public var host: UInt64
    public var size: UInt64
    /// Virtual offset of the first byte of the decompressed block.
    public var virtualStart: UInt64
    /// Length of the decompressed block (a cluster or a grain).
    public var length: Int
}

/// What a format knows about one run: the raw answer a driver gives before runs are merged.
public enum Mapping: Sendable, Equatable {
    case data(file: Int, host: UInt64)
    case compressed(CompressedBlock)
    case zero(host: UInt64?)
    case unallocated(host: UInt64?)
}

/// One run with a single mapping; never crosses a cluster/grain/block boundary where the mapping could change.
public struct Segment: Sendable, Equatable {
    public var start: UInt64
    public var length: UInt64
    public var mapping: Mapping

    public init(start: UInt64, length: UInt64, mapping: Mapping) {
        self.start = start
        self.length = length
        self.mapping = mapping
    }
}

/// An opened image of any format: a virtual size, an allocation map and positioned reads.
/// Implementations keep their metadata immutable after open (caches are locked), so one image can be read
/// from several threads at once.
public protocol DiskImage: AnyObject, Sendable {
    var format: ImageFormat { get }
    var virtualSize: UInt64 { get }
    /// The files whose bytes are read: `files[0]` is the image itself; more only for VMDK descriptors whose
    /// extents the caller explicitly allowed.
    var files: [any ImageStorage] { get }

    /// The mapping of the run that contains `offset` (< virtualSize). Drivers may return a run that starts
    /// before `offset`. `end` is where the caller stops caring: drivers that merge following entries into one
    /// run stop scanning there (an uncapped scan made every 1 MiB read walk a whole 8192-entry L2 table).
    func segment(at offset: UInt64, until end: UInt64) throws -> Segment
    /// Decompresses one whole compressed block into `buffer` (`block.length` bytes).
    func decompress(_ block: CompressedBlock, into buffer: UnsafeMutableRawBufferPointer) throws

    /// qemu-img info's fields.
    func info() -> ImageInfo
    /// A consistency check (qemu-img check).
    func check() throws -> CheckResult

    /// What makes the image unsafe to convert apart from its structure: features that make a reader open other
    /// files, or that imgconv will not interpret. Each format declares its own (default: none).
    var featureReasons: [SafetyReason] { get }
    /// Structural problems that make the image unsafe: by default every corruption `check()` reports; a format
    /// may leave out what it knows to be harmless for reading (qcow2: refcounts that lazy refcounts left stale).
    func structuralReasons() -> [SafetyReason]

    /// Reads virtual bytes; holes and zero runs read as zeros.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
}

extension DiskImage {
    /// The run containing `offset`, merged as far as the driver likes.
    public func segment(at offset: UInt64) throws -> Segment { try segment(at: offset, until: virtualSize) }

    public func decompress(_ block: CompressedBlock, into buffer: UnsafeMutableRawBufferPointer) throws {
        throw ImageError.unsupported(format: format, feature: "compressed blocks")
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try readBySegments(into: buffer, at: offset)
    }

    /// The generic read: walk the segments and fill the buffer from each.
    public func readBySegments(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(buffer.count))
        guard !overflow, end <= virtualSize else {
            throw ImageError.outOfRange(offset: offset, length: UInt64(buffer.count), virtualSize: virtualSize)
        }
        var pos = offset
        var scratch: [UInt8] = []
        while pos < end {
            let seg = try segment(at: pos, until: end)
            guard seg.start <= pos, seg.start + seg.length > pos else {
                throw ImageError.invalidField(format: format, field: "mapping", value: "\(seg.start)+\(seg.length)",
                                              reason: "driver returned a run not containing offset \(pos)")
            }
            let skip = pos - seg.start
            let n = Int(min(seg.start + seg.length, end) - pos)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(pos - offset) + n])
            switch seg.mapping {
            case .zero, .unallocated:
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            case let .data(file, host):
                try files[file].read(into: dst, at: host + skip, what: "\(format.rawValue) data")
            case let .compressed(block):
                if scratch.count < block.length { scratch = [UInt8](repeating: 0, count: block.length) }
                try scratch.withUnsafeMutableBytes { s in
                    let whole = UnsafeMutableRawBufferPointer(rebasing: s[0..<block.length])
                    try decompress(block, into: whole)
                    let from = Int(pos - block.virtualStart)
                    dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: whole[from..<from + n]))
                }
            }
            pos += UInt64(n)
        }
    }

    /// The longest run starting at `offset` with one status, contiguous on the host, at most `maxLength`
    /// bytes and never past the virtual size (qemu's block-status).
    public func extent(at offset: UInt64, maxLength: UInt64 = .max) throws -> Extent {
        precondition(offset < virtualSize, "extent(at:) past the virtual size")
        let limit = offset + min(maxLength, virtualSize - offset)
        var ext = Self.extent(of: try segment(at: offset, until: limit), from: offset)
        while ext.end < limit {
            let next = Self.extent(of: try segment(at: ext.end, until: limit), from: ext.end)
            guard ext.canAbsorb(next) else { break }
            ext.length += next.length
        }
        if ext.end > limit { ext.length = limit - ext.start }
        return ext
    }

    /// Every extent of the image, in order (for `map`).
    public func allExtents(maxLength: UInt64 = .max) throws -> [Extent] {
        var out: [Extent] = []
        var pos: UInt64 = 0
        while pos < virtualSize {
            let e = try extent(at: pos, maxLength: maxLength)
            if let last = out.last, last.canAbsorb(e) {
                out[out.count - 1].length += e.length
            } else {
                out.append(e)
            }
            pos = e.end
        }
        return out
    }

    static func extent(of seg: Segment, from offset: UInt64) -> Extent {
        let skip = offset - seg.start
        let len = seg.length - skip
        switch seg.mapping {
        case let .data(file, host):
            return Extent(start: offset, length: len, status: .data, hostOffset: host + skip, file: file)
        case .compressed:
            return Extent(start: offset, length: len, status: .data, compressed: true)
        case let .zero(host):
            return Extent(start: offset, length: len, status: .zero, hostOffset: host.map { $0 + skip })
        case let .unallocated(host):
            return Extent(start: offset, length: len, status: .unallocated, hostOffset: host.map { $0 + skip })
        }
    }
}

extension Extent {
    /// Whether `next` (which starts where this ends) continues this run, as qemu-img map merges them.
    func canAbsorb(_ next: Extent) -> Bool {
        guard next.start == end, next.status == status, next.compressed == compressed, next.file == file else {
            return false
        }
        switch (hostOffset, next.hostOffset) {
        case (nil, nil): return true
        case let (a?, b?): return a + length == b
        default: return false
        }
    }
}
