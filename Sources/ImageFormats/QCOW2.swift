/// QCOW2 v2 and v3 (qemu's docs/interop/qcow2.txt): L1/L2 mapping, zero clusters, compressed clusters
/// (raw deflate or zstd), extended L2 entries with 32 subclusters. Backing files and external data files are
/// reported, never opened. Snapshots are listed, never read. See formats/qcow2.md.
public final class QCOW2Image: DiskImage {
    public let format = ImageFormat.qcow2
    public let files: [any ImageStorage]
    public let virtualSize: UInt64

    public let version: UInt32
    public let clusterBits: Int
    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public let extendedL2: Bool
    public let refcountOrder: UInt32
    public let incompatibleFeatures: UInt64
    public let compatibleFeatures: UInt64
    public let autoclearFeatures: UInt64
    public let compressionType: UInt8
    public let encryptionMethod: UInt32
    public let backingFile: String?
    public let backingFormat: String?
    public let dataFile: String?
    public let snapshots: [Snapshot]
    public let bitmapDirectory: (offset: UInt64, size: UInt64, count: UInt32)?

    let l1Offset: UInt64
    let l1: OnDiskTable<UInt64>
    let refcountTableOffset: UInt64
    let refcountTableClusters: UInt32
    let snapshotsOffset: UInt64
    let snapshotsTableSize: UInt64
    /// log2 of the number of entries in an L2 table.
    let l2Bits: Int
    private let l2Cache: TableCache<[UInt64]>

    public struct Snapshot: Sendable {
        public var info: SnapshotInfo
        public var l1Offset: UInt64
        public var l1Size: UInt32
    }

    // Field masks from the specification.
    static let l1OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let l2OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let refcountTableOffsetMask: UInt64 = 0xffff_ffff_ffff_fe00
    public static let copiedFlag: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    // Incompatible feature bits.
    static let dirtyBit: UInt64 = 1 << 0
    // Compatible feature bits.
    static let lazyRefcountsBit: UInt64 = 1 << 0
    public static let corruptBit: UInt64 = 1 << 1
    static let dataFileBit: UInt64 = 1 << 2
    public static let compressionTypeBit: UInt64 = 1 << 3
    static let extendedL2Bit: UInt64 = 1 << 4
    static let knownIncompatible: UInt64 = 0x1f
    // Hard limits, as qemu's: a 32 MiB L1 table, 65536 snapshots, an 8 MiB refcount table.
    public static let maxL1Bytes: UInt64 = 32 << 20
    static let maxSnapshots: UInt32 = 65536
    /// The snapshot table is read whole into names and ids: bounded at 8 MiB (qemu allows 64 MiB; a real table
    /// is a few KiB), so a forged one cannot cost memory.
    static let maxSnapshotTableBytes: UInt64 = 8 << 20
    static let maxRefcountTableBytes: UInt64 = 8 << 20

    public init(storage: any ImageStorage, options: OpenOptions = OpenOptions()) throws {
        let fileSize = storage.size
        guard fileSize >= 72 else {
            throw ImageError.pastEndOfFile(what: "qcow2 header", offset: 0, length: 72, fileSize: fileSize)
        }
        let h = try storage.readBytes(at: 0, count: Int(min(fileSize, 112)), what: "qcow2 header")
        func invalid(_ field: String, _ value: Any, _ reason: String) -> ImageError {
            .invalidField(format: .qcow2, field: field, value: "\(value)", reason: reason)
        }
        guard h.hasPrefix(FormatDetector.qcow2Magic) else { throw invalid("magic", h[0..<4].hex, "not a qcow2 image") }
        version = h.be32(4)
        if version == 1 { throw ImageError.unsupported(format: .qcow2, feature: "legacy qcow version 1") }
        guard version == 2 || version == 3 else { throw invalid("version", version, "only versions 2 and 3 exist") }
        let cb = h.be32(20)
        guard (9...21).contains(cb) else { throw invalid("cluster_bits", cb, "must be between 9 and 21 (512 B to 2 MiB)") }
        clusterBits = Int(cb)
        let cs: UInt64 = 1 << UInt64(cb)
        virtualSize = h.be64(24)
        if virtualSize > options.maxVirtualSize {
            throw ImageError.limitExceeded(format: .qcow2, field: "size", value: virtualSize, limit: options.maxVirtualSize)
        }
        encryptionMethod = h.be32(32)
        guard encryptionMethod <= 2 else { throw invalid("crypt_method", encryptionMethod, "unknown encryption method") }

        if version == 3 {
            guard h.count >= 104 else {
                throw ImageError.pastEndOfFile(what: "qcow2 v3 header", offset: 0, length: 104, fileSize: fileSize)
            }
            incompatibleFeatures = h.be64(72)
            compatibleFeatures = h.be64(80)
            autoclearFeatures = h.be64(88)
            refcountOrder = h.be32(96)
            let headerLength = h.be32(100)
            guard headerLength >= 104, UInt64(headerLength) <= cs, headerLength % 8 == 0 || headerLength == 104 else {
                throw invalid("header_length", headerLength, "must be at least 104, a multiple of 8 and fit the first cluster")
            }
            compressionType = headerLength > 104 && h.count > 104 ? h[104] : 0
        } else {
            incompatibleFeatures = 0
            compatibleFeatures = 0
            autoclearFeatures = 0
            refcountOrder = 4
            compressionType = 0
        }
        let unknown = incompatibleFeatures & ~Self.knownIncompatible
        if unknown != 0 {
            throw ImageError.unsupported(format: .qcow2, feature: "unknown incompatible feature bits 0x\(String(unknown, radix: 16))")
        }
        guard refcountOrder <= 6 else { throw invalid("refcount_order", refcountOrder, "must be at most 6 (64-bit refcounts)") }
        guard compressionType <= 1 else { throw invalid("compression_type", compressionType, "only 0 (zlib) and 1 (zstd) exist") }
        if (compressionType != 0) != (incompatibleFeatures & Self.compressionTypeBit != 0) {
            throw invalid("compression_type", compressionType, "does not agree with the compression-type feature bit")
        }
        extendedL2 = incompatibleFeatures & Self.extendedL2Bit != 0
        if extendedL2 && clusterBits < 14 {
            throw invalid("cluster_bits", clusterBits, "extended L2 entries need clusters of at least 16 KiB")
        }
        l2Bits = clusterBits - (extendedL2 ? 4 : 3)

        // L1 table: sized from the header, checked against the virtual size, a hard maximum and the file.
        let l1Size = h.be32(36)
        l1Offset = h.be64(40)
        let l1Span = UInt64(1) << UInt64(l2Bits + clusterBits)  // bytes of virtual disk one L1 entry maps
        let l1Needed = divRoundUp(virtualSize, l1Span)
        guard UInt64(l1Size) >= l1Needed else {
            throw invalid("l1_size", l1Size, "too small for a virtual size of \(virtualSize) (needs \(l1Needed))")
        }
        let l1Bytes = UInt64(l1Size) * 8
        if l1Bytes > Self.maxL1Bytes {
            throw ImageError.limitExceeded(format: .qcow2, field: "l1_size", value: UInt64(l1Size), limit: Self.maxL1Bytes / 8)
        }
        if l1Size > 0 {
            guard l1Offset % cs == 0 else { throw invalid("l1_table_offset", l1Offset, "not aligned to a cluster") }
            try storage.checkRange(offset: l1Offset, length: l1Bytes, what: "qcow2 L1 table")
        }
        // Only the entries that map the virtual disk are used (qemu leaves a larger table after a shrink); a large
        // table is paged, not loaded.
        l1 = try OnDiskTable(storage: storage, offset: l1Offset, count: Int(l1Needed), bigEndian: true, what: "qcow2 L1 table")

        refcountTableOffset = h.be64(48)
        refcountTableClusters = h.be32(56)
        let rtBytes = UInt64(refcountTableClusters) << UInt64(clusterBits)
        if rtBytes > max(Self.maxRefcountTableBytes, cs) {
            throw ImageError.limitExceeded(format: .qcow2, field: "refcount_table_clusters",
                                           value: UInt64(refcountTableClusters), limit: max(Self.maxRefcountTableBytes, cs) >> UInt64(clusterBits))
        }
        guard refcountTableOffset % cs == 0 else {
            throw invalid("refcount_table_offset", refcountTableOffset, "not aligned to a cluster")
        }
        try storage.checkRange(offset: refcountTableOffset, length: rtBytes, what: "qcow2 refcount table")

        // Backing file name: reported, never opened.
        let backingOffset = h.be64(8)
        let backingSize = h.be32(16)
        if backingOffset != 0 {
            guard backingSize <= 1023, backingOffset < cs, UInt64(backingSize) <= cs - backingOffset else {
                throw invalid("backing_file_size", backingSize, "the name must be at most 1023 bytes inside the first cluster")
            }
            let name = try storage.readBytes(at: backingOffset, count: Int(backingSize), what: "qcow2 backing file name")
            backingFile = String(decoding: name, as: UTF8.self)
        } else {
            backingFile = nil
        }

        // Header extensions, between the header and the backing file name (or the end of cluster 0).
        var backingFmt: String?
        var dataFileName: String?
        var bitmaps: (offset: UInt64, size: UInt64, count: UInt32)?
        let extStart = version == 3 ? UInt64(h.be32(100)) : 72
        let extEnd = min(backingOffset != 0 ? backingOffset : cs, fileSize)
        if extStart < extEnd {
            let ext = try storage.readBytes(at: extStart, count: Int(extEnd - extStart), what: "qcow2 header extensions")
            var o = 0
            while o + 8 <= ext.count {
                let type = ext.be32(o)
                let len = Int(ext.be32(o + 4))
                if type == 0 { break }
                guard len <= ext.count - o - 8 else {
                    throw invalid("header extension 0x\(String(type, radix: 16)) length", len, "runs past the header area")
                }
                let body = Array(ext[(o + 8)..<(o + 8 + len)])
                switch type {
                case 0xe279_2aca: backingFmt = String(decoding: body.prefix { $0 != 0 }, as: UTF8.self)
                case 0x4441_5441: dataFileName = String(decoding: body.prefix { $0 != 0 }, as: UTF8.self)
                case 0x2385_2875:
                    guard len >= 24 else { throw invalid("bitmaps extension length", len, "must be at least 24") }
                    bitmaps = (body.be64(16), body.be64(8), body.be32(0))
                default: break  // feature names, crypto header, unknown compatible extensions
                }
                o += 8 + (len + 7) / 8 * 8
            }
        }
        backingFormat = backingFmt
        dataFile = dataFileName ?? (incompatibleFeatures & Self.dataFileBit != 0 ? "" : nil)
        bitmapDirectory = bitmaps

        // Snapshot table: listed for info and walked by check, never read as data.
        let nbSnapshots = h.be32(60)
        snapshotsOffset = h.be64(64)
        guard nbSnapshots <= Self.maxSnapshots else {
            throw ImageError.limitExceeded(format: .qcow2, field: "nb_snapshots", value: UInt64(nbSnapshots), limit: UInt64(Self.maxSnapshots))
        }
        var snaps: [Snapshot] = []
        var so = snapshotsOffset
        if nbSnapshots > 0 {
            guard snapshotsOffset % cs == 0 else { throw invalid("snapshots_offset", snapshotsOffset, "not aligned to a cluster") }
        }
        for i in 0..<nbSnapshots {
            let e = try storage.readBytes(at: so, count: 40, what: "qcow2 snapshot \(i)")
            let idSize = Int(e.be16(12)), nameSize = Int(e.be16(14)), extraSize = Int(e.be32(36))
            guard extraSize <= 1024 else {
                throw ImageError.limitExceeded(format: .qcow2, field: "snapshot extra_data_size", value: UInt64(extraSize), limit: 1024)
            }
            let entryEnd = so - snapshotsOffset + UInt64(40 + extraSize + idSize + nameSize)
            guard entryEnd <= Self.maxSnapshotTableBytes else {
                throw ImageError.limitExceeded(format: .qcow2, field: "snapshot table size", value: entryEnd, limit: Self.maxSnapshotTableBytes)
            }
            let rest = try storage.readBytes(at: so + 40, count: extraSize + idSize + nameSize, what: "qcow2 snapshot \(i)")
            var vmState = UInt64(e.be32(32))
            var icount: UInt64? = nil
            if extraSize >= 8 { vmState = max(vmState, rest.be64(0)) }
            if extraSize >= 24 { let v = rest.be64(16); icount = v == UInt64.max ? nil : v }
            let info = SnapshotInfo(
                id: String(decoding: rest[extraSize..<(extraSize + idSize)], as: UTF8.self),
                name: String(decoding: rest[(extraSize + idSize)...], as: UTF8.self),
                vmStateSize: vmState, dateSec: e.be32(16), dateNsec: e.be32(20), vmClockNsec: e.be64(24),
                icount: icount ?? (extraSize >= 24 ? nil : 0))
            snaps.append(Snapshot(info: info, l1Offset: e.be64(0), l1Size: e.be32(8)))
            so += UInt64((40 + extraSize + idSize + nameSize + 7) / 8 * 8)
        }
        snapshots = snaps
        snapshotsTableSize = so - snapshotsOffset

        files = [storage]
        let tableBytes = Int(cs)
        l2Cache = TableCache(capacityBytes: options.metadataCacheBytes, tableBytes: tableBytes)
    }

    var compressionKind: Codec.Kind { compressionType == 1 ? .zstd : .rawDeflate }

    /// A compressed L2 entry's host byte offset and size. With `x = 62 - (cluster_bits - 8)`, bits 0..x-1 hold
    /// the offset and bits x..61 the additional 512-byte sectors; the size rounds up to whole sectors.
    func compressedRange(_ entry: UInt64) -> (host: UInt64, size: UInt64) {
        let shift = UInt64(62 - (clusterBits - 8))
        let mask = (UInt64(1) << UInt64(clusterBits - 8)) - 1
        let host = entry & ((UInt64(1) << shift) - 1)
        return (host, (((entry >> shift) & mask) + 1) * 512 - (host & 511))
    }
    var l2EntriesPerTable: Int { 1 << l2Bits }

    /// Loads (through the cache) the L2 table at `offset`, as 64-bit words (two per entry with extended L2).
    func l2Table(at offset: UInt64) throws -> [UInt64] {
        try l2Cache.table(at: offset) {
            let raw = try files[0].readBytes(at: offset, count: Int(clusterSize), what: "qcow2 L2 table")
            return (0..<(raw.count / 8)).map { raw.be64($0 * 8) }
        }
    }

    public func segment(at offset: UInt64, until end: UInt64) throws -> Segment {
        if encryptionMethod != 0 {
            throw ImageError.unsupported(format: .qcow2, feature: "encryption (\(encryptionMethod == 1 ? "AES" : "LUKS"))")
        }
        let cs = clusterSize
        let vcl = offset >> UInt64(clusterBits)
        let l1i = Int(vcl >> UInt64(l2Bits))
        let l1Span = UInt64(1) << UInt64(l2Bits + clusterBits)
        let l1Start = UInt64(l1i) * l1Span
        let l2Offset = try l1[l1i] & Self.l1OffsetMask
        if l2Offset == 0 {
            return Segment(start: l1Start, length: min(l1Span, virtualSize - l1Start), mapping: .unallocated(host: nil))
        }
        guard l2Offset % cs == 0 else {
            throw ImageError.invalidField(format: .qcow2, field: "L1 entry \(l1i)", value: "0x\(String(l2Offset, radix: 16))",
                                          reason: "L2 table offset is not cluster-aligned")
        }
        let table = try l2Table(at: l2Offset)
        var seg = try clusterSegment(table: table, index: Int(vcl & UInt64(l2EntriesPerTable - 1)),
                                     clusterStart: vcl << UInt64(clusterBits), offset: offset)
        // Extend over following clusters of the same table that continue the run (qemu's block-status does the same).
        if case .compressed = seg.mapping { return seg }
        var next = (vcl + 1)
        while seg.start + seg.length == next << UInt64(clusterBits), next << UInt64(clusterBits) < min(end, virtualSize),
              next >> UInt64(l2Bits) == UInt64(l1i) {
            let start = next << UInt64(clusterBits)
            let n = try clusterSegment(table: table, index: Int(next & UInt64(l2EntriesPerTable - 1)), clusterStart: start, offset: start)
            guard Self.continues(seg, n) else { break }
            seg.length += n.length
            next += 1
        }
        return seg
    }

    static func continues(_ a: Segment, _ b: Segment) -> Bool {
        switch (a.mapping, b.mapping) {
        case let (.data(f1, h1), .data(f2, h2)): return f1 == f2 && h1 + a.length == h2
        case let (.zero(h1), .zero(h2)), let (.unallocated(h1), .unallocated(h2)):
            switch (h1, h2) {
            case (nil, nil): return true
            case let (x?, y?): return x + a.length == y
            default: return false
            }
        default: return false
        }
    }

    /// The run inside one cluster that contains `offset`.
    func clusterSegment(table: [UInt64], index: Int, clusterStart: UInt64, offset: UInt64) throws -> Segment {
        let cs = clusterSize
        let clusterLen = min(cs, virtualSize - clusterStart)
        let entry = table[extendedL2 ? index * 2 : index]
        func invalid(_ reason: String) -> ImageError {
            .invalidField(format: .qcow2, field: "L2 entry for offset \(clusterStart)",
                          value: "0x\(String(entry, radix: 16))", reason: reason)
        }
        if entry & Self.compressedFlag != 0 {
            let (host, size) = compressedRange(entry)
            // The size rounds up to whole sectors, so it may pass the end of the file by less than a sector.
            guard host < files[0].size, host + size <= files[0].size + 511 else {
                throw ImageError.pastEndOfFile(what: "qcow2 compressed cluster", offset: host, length: size, fileSize: files[0].size)
            }
            if dataFile != nil { throw invalid("compressed clusters cannot live in an external data file") }
            return Segment(start: clusterStart, length: clusterLen,
                           mapping: .compressed(CompressedBlock(host: host, size: size, virtualStart: clusterStart, length: Int(cs))))
        }
        let host = entry & Self.l2OffsetMask
        if host % cs != 0 { throw invalid("cluster offset is not cluster-aligned") }
        if host != 0, let dataFile {
            throw ImageError.externalFile(format: .qcow2, kind: "an external data file", name: dataFile)
        }
        if !extendedL2 {
            if entry & Self.zeroFlag != 0 {
                return Segment(start: clusterStart, length: clusterLen, mapping: .zero(host: host == 0 ? nil : host))
            }
            if host == 0 { return Segment(start: clusterStart, length: clusterLen, mapping: .unallocated(host: nil)) }
            try files[0].checkRange(offset: host, length: clusterLen, what: "qcow2 data cluster")
            return Segment(start: clusterStart, length: clusterLen, mapping: .data(file: 0, host: host))
        }
        // Extended L2: 32 subclusters; bit i of the low half = allocated, bit 32+i = reads as zero.
        let bitmap = table[index * 2 + 1]
        let alloc = UInt32(truncatingIfNeeded: bitmap), zero = UInt32(truncatingIfNeeded: bitmap >> 32)
        if alloc & zero != 0 { throw invalid("subcluster bitmap 0x\(String(bitmap, radix: 16)) marks a subcluster both allocated and zero") }
        if host == 0 && alloc != 0 { throw invalid("subclusters allocated in an unallocated cluster") }
        let sub = cs / 32
        let first = Int((offset - clusterStart) / sub)
        func kind(_ i: Int) -> Int { alloc >> UInt32(i) & 1 != 0 ? 1 : (zero >> UInt32(i) & 1 != 0 ? 2 : 0) }
        let k = kind(first)
        var last = first
        while last + 1 < 32 && kind(last + 1) == k { last += 1 }
        let start = clusterStart + UInt64(first) * sub
        let end = min(clusterStart + UInt64(last + 1) * sub, clusterStart + clusterLen)
        let subHost = host == 0 ? nil : host + UInt64(first) * sub
        let mapping: Mapping
        switch k {
        case 1:
            // qemu extends the file only as far as the subclusters it wrote: check just this run.
            try files[0].checkRange(offset: subHost!, length: end - start, what: "qcow2 data subclusters")
            mapping = .data(file: 0, host: subHost!)
        case 2: mapping = .zero(host: subHost)
        default: mapping = .unallocated(host: subHost)
        }
        return Segment(start: start, length: end - start, mapping: mapping)
    }

    public func decompress(_ block: CompressedBlock, into buffer: UnsafeMutableRawBufferPointer) throws {
        let avail = min(block.size, files[0].size - block.host)
        let src = try files[0].readBytes(at: block.host, count: Int(avail), what: "qcow2 compressed cluster")
        do {
            _ = try src.withUnsafeBytes { s in
                try Codec.decompress(compressionKind, s, into: buffer, mustFill: true)
            }
        } catch let e as Codec.CodecError {
            throw ImageError.decompression(format: .qcow2, offset: block.host, reason: e.reason)
        }
    }

    public func info() -> ImageInfo {
        var i = ImageInfo(filename: files[0].name, format: .qcow2, virtualSize: virtualSize)
        i.clusterSize = clusterSize
        i.actualSize = files[0].allocatedBytes
        i.dirty = incompatibleFeatures & Self.dirtyBit != 0
        i.encrypted = encryptionMethod != 0
        i.backingFilename = backingFile
        i.backingFormat = backingFormat
        i.snapshots = snapshots.map(\.info)
        var d: [(String, JSON)] = [
            ("compat", .string(version == 2 ? "0.10" : "1.1")),
            ("compression-type", .string(compressionType == 1 ? "zstd" : "zlib")),
        ]
        if version == 3 {
            d.append(("lazy-refcounts", .bool(compatibleFeatures & 1 != 0)))
        }
        if encryptionMethod != 0 {
            d.append(("encrypt", .object([("format", .string(encryptionMethod == 1 ? "aes" : "luks"))])))
        }
        d.append(("refcount-bits", .uint(1 << UInt64(refcountOrder))))
        if version == 3 {
            d.append(("corrupt", .bool(incompatibleFeatures & Self.corruptBit != 0)))
            d.append(("extended-l2", .bool(extendedL2)))
        }
        if let dataFile {
            d.append(("data-file", .string(dataFile)))
            d.append(("data-file-raw", .bool(autoclearFeatures & 2 != 0)))
        }
        i.specific = .object(d)
        return i
    }

    public func check() throws -> CheckResult {
        var checker = QCOW2Checker(image: self)
        return try checker.run()
    }

    /// Set after a crash of a writer that used lazy refcounts: the refcounts are stale by design (qemu rebuilds
    /// them on the next read-write open) and reads never use them.
    public var refcountsMayBeStale: Bool {
        incompatibleFeatures & Self.dirtyBit != 0 && compatibleFeatures & Self.lazyRefcountsBit != 0
    }

    public var featureReasons: [SafetyReason] {
        var out: [SafetyReason] = []
        if let b = backingFile {
            var why = "a backing file makes readers open another file"
            if b.hasPrefix("json:") { why += " (a json: specification can name any protocol or file)" }
            if b.contains("..") || b.hasPrefix("/") { why += " (the name leaves the image's directory)" }
            out.append(SafetyReason("backing-file", "qcow2 backing_file '\(b)': \(why)"))
        }
        if let d = dataFile {
            out.append(SafetyReason("data-file", "qcow2 external data_file '\(d)': guest data would be read from another file (CVE-2024-32498)"))
        }
        if encryptionMethod != 0 {
            out.append(SafetyReason("encryption", "qcow2 encryption (\(encryptionMethod == 1 ? "AES" : "LUKS")) cannot be converted"))
        }
        if incompatibleFeatures & Self.corruptBit != 0 {
            out.append(SafetyReason("corrupt", "qcow2 header has the corrupt bit set"))
        }
        return out
    }

    /// Refcount mismatches do not count when the refcounts may be stale; overlaps between metadata and anything
    /// else, and pointers out of the file, still do.
    public func structuralReasons() -> [SafetyReason] {
        do {
            let r = try check()
            return ImageInspector.structuralReasons(r, ignoring: refcountsMayBeStale ? r.refcountErrors : 0)
        } catch let e as ImageError {
            return [ImageInspector.reason(for: e)]
        } catch {
            return [SafetyReason("corrupt", "\(error)")]
        }
    }
}
