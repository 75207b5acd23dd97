/// VMDK: hosted sparse extents (monolithicSparse, streamOptimized with compressed grains, markers and a
/// footer) and text descriptors (monolithicFlat, twoGbMaxExtentSparse/Flat). Extents in other files are
/// reported and opened only when the caller allows it. See formats/vmdk.md.
public final class VMDKImage: DiskImage {
    public let format = ImageFormat.vmdk
    public let files: [any ImageStorage]
    public let virtualSize: UInt64
    public let createType: String
    public let cid: UInt32
    public let parentCID: UInt32
    public let extents: [Extent]
    /// The file holds a text descriptor rather than a sparse header.
    public let isDescriptorFile: Bool
    /// The descriptor text (embedded or the file itself), for inspection.
    public let descriptorText: String?
    /// Sector of the embedded descriptor in a sparse extent (VMware and qemu always use 1).
    let descriptorSector: UInt64

    /// One extent of the virtual disk, in descriptor order.
    public struct Extent: Sendable {
        public enum Kind: Sendable {
            case sparse(SparseExtent)
            case flat(file: Int, offset: UInt64)
            case zero
            /// Named in the descriptor but not opened.
            case external(name: String)
        }
        public var start: UInt64
        public var length: UInt64
        public var kind: Kind
        public var typeName: String
        public var fileName: String
    }

    /// Real descriptors are a few KiB (512 extents of a 1 TiB twoGbMaxExtent image: ~25 KiB).
    static let descriptorLimit: UInt64 = 64 << 10

    public init(storage: any ImageStorage, options: OpenOptions = OpenOptions(),
                extentOpener: ((String) throws -> any ImageStorage)? = nil) throws {
        let head = try storage.readBytes(at: 0, count: Int(min(storage.size, 512)), what: "vmdk header")
        if head.hasPrefix(FormatDetector.vmdkCOWDMagic) {
            throw ImageError.unsupported(format: .vmdk, feature: "VMware ESX COWD (vmfsSparse) extents")
        }
        if head.hasPrefix(FormatDetector.vmdkSparseMagic) {
            // A hosted sparse extent, with its descriptor embedded.
            let sparse = try SparseExtent(storage: storage, fileIndex: 0, options: options)
            isDescriptorFile = false
            files = [storage]
            virtualSize = sparse.capacity
            var ct = sparse.isStreamOptimized ? "streamOptimized" : "monolithicSparse"
            var c: UInt32 = 0, p: UInt32 = 0xffff_ffff
            descriptorText = sparse.embeddedDescriptor
            descriptorSector = sparse.descriptorRange.0 / 512
            if let text = sparse.embeddedDescriptor {
                let d = Descriptor(text: text)
                ct = d.createType ?? ct
                c = d.cid
                p = d.parentCID
            }
            createType = ct
            cid = c
            parentCID = p
            extents = [Extent(start: 0, length: sparse.capacity, kind: .sparse(sparse), typeName: "",
                              fileName: storage.name)]
            return
        }
        // A text descriptor naming extents in other files.
        guard storage.size <= Self.descriptorLimit else {
            throw ImageError.limitExceeded(format: .vmdk, field: "descriptor file size", value: storage.size,
                                           limit: Self.descriptorLimit)
        }
        let raw = try storage.readBytes(at: 0, count: Int(storage.size), what: "vmdk descriptor")
        let text = String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        let d = Descriptor(text: text)
        descriptorText = text
        descriptorSector = 0
        guard let ct = d.createType else {
            throw ImageError.invalidField(format: .vmdk, field: "createType", value: "(missing)",
                                          reason: "a descriptor must name its create type")
        }
        isDescriptorFile = true
        createType = ct
        cid = d.cid
        parentCID = d.parentCID
        var opened: [any ImageStorage] = [storage]
        var list: [Extent] = []
        var pos: UInt64 = 0
        for line in d.extents {
            let (bytes, overflow) = line.sectors.multipliedReportingOverflow(by: 512)
            if overflow || bytes > options.maxVirtualSize || pos + bytes > options.maxVirtualSize {
                throw ImageError.limitExceeded(format: .vmdk, field: "extent size", value: line.sectors,
                                               limit: options.maxVirtualSize / 512)
            }
            var kind: Extent.Kind = .external(name: line.fileName)
            switch line.type {
            case "ZERO":
                kind = .zero
            case "FLAT", "VMFS", "SPARSE":
                if options.allowVMDKExtentFiles, let opener = extentOpener {
                    guard Self.isPlainName(line.fileName) else {
                        throw ImageError.externalFile(format: .vmdk, kind: "an extent outside the descriptor's directory",
                                                      name: line.fileName)
                    }
                    let s = try opener(line.fileName)
                    opened.append(s)
                    let idx = opened.count - 1
                    if line.type == "SPARSE" {
                        let sp = try SparseExtent(storage: s, fileIndex: idx, options: options)
                        guard sp.capacity >= bytes else {
                            throw ImageError.invalidField(format: .vmdk, field: "extent \(line.fileName) capacity",
                                                          value: "\(sp.capacity)", reason: "smaller than the descriptor's \(bytes)")
                        }
                        kind = .sparse(sp)
                    } else {
                        let (base, of) = line.offsetSectors.multipliedReportingOverflow(by: 512)
                        guard !of, fits(base, bytes, in: s.size) else {
                            throw ImageError.pastEndOfFile(what: "vmdk flat extent '\(line.fileName)'", offset: base,
                                                           length: bytes, fileSize: s.size)
                        }
                        kind = .flat(file: idx, offset: base)
                    }
                }
            default:
                throw ImageError.unsupported(format: .vmdk, feature: "extent type \(line.type)")
            }
            var shownName = line.fileName
            if case .external = kind {} else if case .zero = kind {} else { shownName = opened[opened.count - 1].name }
            list.append(Extent(start: pos, length: bytes, kind: kind, typeName: line.type, fileName: shownName))
            pos += bytes
        }
        files = opened
        extents = list
        virtualSize = pos
    }

    /// Only monolithicSparse and streamOptimized are read from one file; every other create type, and any
    /// extent in a descriptor file, names other files (CVE-2022-47951).
    public var featureReasons: [SafetyReason] {
        var out: [SafetyReason] = []
        if !["monolithicSparse", "streamOptimized"].contains(createType) {
            out.append(SafetyReason("vmdk-create-type", "unsupported subformat (createType \"\(createType)\"): only monolithicSparse and streamOptimized are safe; other types name extent files (CVE-2022-47951)"))
        }
        for e in extents {
            if case .sparse = e.kind, !isDescriptorFile { continue }
            out.append(SafetyReason("vmdk-extent", "the descriptor names extent file '\(e.fileName)'"))
        }
        return out + descriptorProblems
    }

    /// What a strict reading of the descriptor objects to (the inspection step reports these).
    public var descriptorProblems: [SafetyReason] {
        var out: [SafetyReason] = []
        if !isDescriptorFile && descriptorText != nil && descriptorSector != 1 {
            out.append(SafetyReason("vmdk-descriptor", "wrong descriptor location: sector \(descriptorSector), expected 1"))
        }
        guard let text = descriptorText else { return out }
        var sawCreateType = false
        var extents = 0
        for line in descriptorLines(Array(text.utf8)) {
            let first = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).first.map { $0.uppercased() } ?? ""
            if ["RW", "RDONLY", "NOACCESS"].contains(first) {
                guard let e = Descriptor.parseExtent(first + line.dropFirst(first.count)) else {
                    out.append(SafetyReason("vmdk-descriptor", "invalid descriptor data: extent line '\(line)'"))
                    continue
                }
                extents += 1
                // Whatever token names the file (quoted, or bare where the type is missing), no path may appear.
                let rest = "\(e.type) \(e.fileName)"
                if rest.contains("/") || rest.contains("\\") || rest.contains("..") {
                    out.append(SafetyReason("vmdk-extent", "extent filenames may not name paths: '\(line)'"))
                }
                continue
            }
            if line.contains("=") {
                if line.hasPrefix("createType") { sawCreateType = true }
                continue
            }
            if line.lowercased().hasPrefix("ddb") { continue }
            out.append(SafetyReason("vmdk-descriptor", "invalid descriptor data: '\(line)'"))
        }
        if !sawCreateType { out.append(SafetyReason("vmdk-create-type", "unsupported subformat: the descriptor has no createType")) }
        if extents == 0 { out.append(SafetyReason("vmdk-descriptor", "no extents found in the descriptor")) }
        return out
    }

    /// A name that stays in the descriptor's own directory.
    static func isPlainName(_ name: String) -> Bool {
        !name.isEmpty && !name.contains("/") && name != "." && name != ".." && !name.contains("\0")
    }

    func extentIndex(for offset: UInt64) -> Int {
        var lo = 0, hi = extents.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if extents[mid].start <= offset { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }

    public func segment(at offset: UInt64, until end: UInt64) throws -> Segment {
        let e = extents[extentIndex(for: offset)]
        let rel = offset - e.start
        switch e.kind {
        case .zero:
            return Segment(start: e.start, length: e.length, mapping: .zero(host: nil))
        case let .flat(file, base):
            // Holes in a flat extent file read as zero: report them so the converter skips them.
            let host = base + rel
            try files[file].checkRange(offset: host, length: e.length - rel, what: "vmdk flat extent '\(e.fileName)'")
            let (isData, end) = try files[file].allocation(at: host)
            let len = min(e.length - rel, max(1, end - host))
            return Segment(start: offset, length: len, mapping: isData ? .data(file: file, host: host) : .zero(host: host))
        case let .external(name):
            throw ImageError.externalFile(format: .vmdk, kind: "an extent file", name: name)
        case let .sparse(sp):
            var seg = try sp.segment(at: rel, until: end - e.start, files: files)
            seg.start += e.start
            if case var .compressed(b) = seg.mapping {
                b.virtualStart += e.start
                seg.mapping = .compressed(b)
            }
            return seg
        }
    }

    public func decompress(_ block: CompressedBlock, into buffer: UnsafeMutableRawBufferPointer) throws {
        let e = extents[extentIndex(for: block.virtualStart)]
        guard case let .sparse(sp) = e.kind else {
            throw ImageError.invalidField(format: .vmdk, field: "grain", value: "\(block.host)", reason: "not in a sparse extent")
        }
        try sp.decompress(block, file: files[sp.fileIndex], into: buffer)
    }

    public func info() -> ImageInfo {
        var i = ImageInfo(filename: files[0].name, format: .vmdk, virtualSize: virtualSize)
        i.actualSize = files.reduce(UInt64(0)) { $0 + ($1.allocatedBytes ?? 0) }
        var list: [JSON] = []
        for e in extents {
            var p: [(String, JSON)] = []
            if case let .sparse(sp) = e.kind {
                if sp.isCompressed { p.append(("compressed", .bool(true))) }
                p.append(("virtual-size", .uint(e.length)))
                p.append(("filename", .string(e.fileName)))
                p.append(("cluster-size", .uint(sp.grainBytes)))
                if i.clusterSize == nil { i.clusterSize = sp.grainBytes }
            } else {
                p.append(("virtual-size", .uint(e.length)))
                p.append(("filename", .string(e.fileName)))
            }
            p.append(("format", .string(e.typeName)))
            list.append(.object(p))
        }
        i.specific = .object([
            ("cid", .uint(UInt64(cid))),
            ("parent-cid", .uint(UInt64(parentCID))),
            ("create-type", .string(createType)),
            ("extents", .array(list)),
        ])
        return i
    }

    public func check() throws -> CheckResult {
        var r = CheckResult(filename: files[0].name, format: .vmdk)
        for e in extents {
            switch e.kind {
            case let .sparse(sp): try sp.check(file: files[sp.fileIndex], into: &r)
            case let .flat(file, offset):
                if !fits(offset, e.length, in: files[file].size) {
                    r.corruption("flat extent '\(e.fileName)' needs \(offset + e.length) bytes but the file has \(files[file].size)")
                }
            case .zero, .external: break
            }
        }
        return r
    }
}

/// The parsed text of a descriptor.
struct Descriptor {
    struct ExtentLine { var access: String; var sectors: UInt64; var type: String; var fileName: String; var offsetSectors: UInt64 }
    var createType: String?
    var cid: UInt32 = 0
    var parentCID: UInt32 = 0xffff_ffff
    var extents: [ExtentLine] = []

    init(text: String) {
        for line in descriptorLines(Array(text.utf8)) {
            if line.hasPrefix("RW ") || line.hasPrefix("RDONLY ") || line.hasPrefix("NOACCESS ") {
                if let e = Self.parseExtent(line) { extents.append(e) }
                continue
            }
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = line[..<eq].trimmingSpaces()
            var value = line[line.index(after: eq)...].trimmingSpaces()
            if value.hasPrefix("\"") && value.hasSuffix("\"") && value.count >= 2 { value = String(value.dropFirst().dropLast()) }
            switch key {
            case "createType": createType = value
            case "CID": cid = UInt32(value, radix: 16) ?? 0
            case "parentCID": parentCID = UInt32(value, radix: 16) ?? 0xffff_ffff
            default: break
            }
        }
    }

    /// `ACCESS SECTORS TYPE ["FILENAME" [OFFSET]]`
    static func parseExtent(_ line: String) -> ExtentLine? {
        var rest = Substring(line)
        func word() -> String? {
            while rest.first == " " || rest.first == "\t" { rest.removeFirst() }
            guard !rest.isEmpty else { return nil }
            if rest.first == "\"" {
                rest.removeFirst()
                guard let close = rest.firstIndex(of: "\"") else { return nil }
                let w = String(rest[..<close])
                rest = rest[rest.index(after: close)...]
                return w
            }
            let end = rest.firstIndex(where: { $0 == " " || $0 == "\t" }) ?? rest.endIndex
            let w = String(rest[..<end])
            rest = rest[end...]
            return w
        }
        guard let access = word(), let s = word(), let sectors = UInt64(s), let type = word() else { return nil }
        let name = word() ?? ""
        let off = word().flatMap { UInt64($0) } ?? 0
        return ExtentLine(access: access, sectors: sectors, type: type, fileName: name, offsetSectors: off)
    }
}

/// A hosted sparse extent ("KDMV"): grain directory -> grain tables -> grains.
public struct SparseExtent: Sendable {
    public let fileIndex: Int
    public let capacity: UInt64
    public let grainBytes: UInt64
    public let flags: UInt32
    public let isCompressed: Bool
    public let hasMarkers: Bool
    public let gtes: Int
    public let gdOffset: UInt64
    public let embeddedDescriptor: String?
    public let descriptorRange: (UInt64, UInt64)
    let gd: OnDiskTable<UInt32>
    let gtCache: TableCache<[UInt32]>
    var isStreamOptimized: Bool { isCompressed && hasMarkers }
    var gtSpan: UInt64 { grainBytes * UInt64(gtes) }
    var zeroedGrainFlag: Bool { flags & (1 << 2) != 0 }

    static let gdAtEnd = UInt64.max
    static let maxGrainSectors: UInt64 = 4096  // 2 MiB: the largest grain imgconv decompresses in one piece
    /// qemu's limit on grain directory entries (32 Mi: 8 TiB with 512-byte grains and 512-entry tables, far past
    /// the 2 TiB hosted sparse extents hold).
    static let maxGDEntries: UInt64 = 32 << 20

    init(storage: any ImageStorage, fileIndex: Int, options: OpenOptions) throws {
        func invalid(_ f: String, _ v: Any, _ r: String) -> ImageError {
            .invalidField(format: .vmdk, field: f, value: "\(v)", reason: r)
        }
        var h = try storage.readBytes(at: 0, count: 512, what: "vmdk sparse header")
        guard h.hasPrefix(FormatDetector.vmdkSparseMagic) else { throw invalid("magic", h[0..<4].hex, "not a sparse extent") }
        let version = h.le32(4)
        guard (1...3).contains(version) else { throw ImageError.unsupported(format: .vmdk, feature: "sparse extent version \(version)") }
        if h.le64(56) == Self.gdAtEnd {
            // streamOptimized written front to back: the real header is in the footer before the end-of-stream marker.
            let size = storage.size
            guard size >= 1536 + 512 else { throw invalid("gdOffset", "GD_AT_END", "no room for a footer") }
            let tail = try storage.readBytes(at: size - 1536, count: 1536, what: "vmdk footer")
            guard tail.le32(8) == 0, tail.le32(12) == 3, tail.hasPrefix(FormatDetector.vmdkSparseMagic, at: 512),
                  tail.le32(1024 + 8) == 0, tail.le32(1024 + 12) == 0 else {
                throw invalid("footer", "at \(size - 1536)", "the footer marker, footer or end-of-stream marker is missing")
            }
            guard tail[16..<512].allSatisfy({ $0 == 0 }), tail[(1024 + 16)...].allSatisfy({ $0 == 0 }) else {
                throw invalid("footer", "markers", "the footer and end-of-stream markers must be zero-padded")
            }
            let footer = Array(tail[512..<1024])
            guard footer.le64(56) != Self.gdAtEnd else {
                throw invalid("footer gdOffset", "GD_AT_END", "the footer must hold the real offset, not point to another footer")
            }
            // The footer repeats the header: a different version or descriptor location is a second, hidden header.
            guard footer.le32(4) == h.le32(4) else { throw invalid("footer version", footer.le32(4), "differs from the header's \(h.le32(4))") }
            guard footer.le64(28) == h.le64(28), footer.le64(36) == h.le64(36) else {
                throw invalid("footer descriptor", "\(footer.le64(28))+\(footer.le64(36))", "differs from the header's descriptor location")
            }
            h = footer
        }
        flags = h.le32(8)
        let capSectors = h.le64(12)
        let grainSectors = h.le64(20)
        let descOffset = h.le64(28), descSize = h.le64(36)
        gtes = Int(h.le32(44))
        gdOffset = h.le64(56)
        let compressAlgorithm = h.le16(77)
        isCompressed = flags & (1 << 16) != 0
        hasMarkers = flags & (1 << 17) != 0
        self.fileIndex = fileIndex
        if isCompressed && compressAlgorithm != 1 {
            throw ImageError.unsupported(format: .vmdk, feature: "compression algorithm \(compressAlgorithm)")
        }
        guard grainSectors >= 1, grainSectors <= Self.maxGrainSectors else {
            throw invalid("grainSize", grainSectors, "must be 1 to \(Self.maxGrainSectors) sectors")
        }
        grainBytes = grainSectors * 512
        guard gtes >= 1, gtes <= 512 else { throw invalid("numGTEsPerGT", gtes, "must be 1 to 512") }
        let (cap, of) = capSectors.multipliedReportingOverflow(by: 512)
        if of || cap > options.maxVirtualSize {
            throw ImageError.limitExceeded(format: .vmdk, field: "capacity", value: capSectors, limit: options.maxVirtualSize / 512)
        }
        capacity = cap
        // The embedded descriptor (monolithicSparse / streamOptimized).
        if descOffset != 0 && descSize != 0 {
            // Only the first 64 KiB are read, whatever descriptorSize claims: real descriptors are under 1 KiB,
            // and a forged size must not cost memory (the structural check still sees the whole claimed range).
            guard descOffset < UInt64.max / 512, descSize < UInt64.max / 512,
                  fits(descOffset * 512, descSize * 512, in: storage.size) else {
                throw ImageError.pastEndOfFile(what: "vmdk embedded descriptor", offset: descOffset &* 512,
                                               length: descSize &* 512, fileSize: storage.size)
            }
            let bytes = try storage.readBytes(at: descOffset * 512, count: Int(min(descSize * 512, 64 << 10)),
                                              what: "vmdk embedded descriptor")
            embeddedDescriptor = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            descriptorRange = (descOffset * 512, descSize * 512)
        } else {
            embeddedDescriptor = nil
            descriptorRange = (0, 0)
        }
        if capacity == 0 && embeddedDescriptor != nil {
            // qemu then treats the embedded text as a descriptor and opens its extents: the way host files leak.
            throw ImageError.unsupported(format: .vmdk, feature: "a sparse header with capacity 0 and an embedded descriptor")
        }
        // Grain directory: one entry per grain table the capacity needs, bounded, checked against the file, and
        // paged when it is large (OnDiskTable).
        let gdEntries = divRoundUp(capacity, grainBytes * UInt64(gtes))
        guard gdEntries <= Self.maxGDEntries else {
            throw ImageError.limitExceeded(format: .vmdk, field: "grain directory entries", value: gdEntries, limit: Self.maxGDEntries)
        }
        let (gdByteOffset, of3) = gdOffset.multipliedReportingOverflow(by: 512)
        if of3 { throw invalid("gdOffset", gdOffset, "overflows") }
        gd = try OnDiskTable(storage: storage, offset: gdByteOffset, count: Int(gdEntries), bigEndian: false,
                             what: "vmdk grain directory")
        gtCache = TableCache(capacityBytes: options.metadataCacheBytes, tableBytes: gtes * 4)
    }

    func grainTable(_ gdi: Int, storage: any ImageStorage) throws -> [UInt32] {
        let off = UInt64(try gd[gdi]) * 512
        return try gtCache.table(at: off) {
            try OnDiskTable<UInt32>.load(storage, at: off, count: gtes, bigEndian: false, what: "vmdk grain table")
        }
    }

    /// The run containing `rel` (relative to the extent).
    func segment(at rel: UInt64, until end: UInt64, files: [any ImageStorage]) throws -> Segment {
        let storage = files[fileIndex]
        let gi = rel / grainBytes
        let gdi = Int(gi / UInt64(gtes))
        if try gd[gdi] == 0 {
            let start = UInt64(gdi) * gtSpan
            return Segment(start: start, length: min(gtSpan, capacity - start), mapping: .unallocated(host: nil))
        }
        let gt = try grainTable(gdi, storage: storage)
        // Fast path for runs of unallocated grains (qemu preallocates every grain table, so a 1 TiB image has
        // 32768 tables of mostly zeros): compare the raw entries, build no segments.
        let first = Int(gi % UInt64(gtes))
        if gt[first] == 0 {
            var k = first + 1
            let lastGrain = min(UInt64(gtes), divRoundUp(min(capacity, end), grainBytes) - UInt64(gdi) * UInt64(gtes))
            while k < Int(lastGrain) && gt[k] == 0 { k += 1 }
            let start = gi * grainBytes
            let stop = min((UInt64(gdi) * UInt64(gtes) + UInt64(k)) * grainBytes, capacity)
            return Segment(start: start, length: max(stop, start + 1) - start, mapping: .unallocated(host: nil))
        }
        var seg = try grainSegment(gt: gt, gi: gi, storage: storage)
        if case .compressed = seg.mapping { return seg }
        var next = gi + 1
        while next * grainBytes < min(capacity, end), Int(next / UInt64(gtes)) == gdi {
            let n = try grainSegment(gt: gt, gi: next, storage: storage)
            guard QCOW2Image.continues(seg, n) else { break }
            seg.length += n.length
            next += 1
        }
        return seg
    }

    func grainSegment(gt: [UInt32], gi: UInt64, storage: any ImageStorage) throws -> Segment {
        let start = gi * grainBytes
        let len = min(grainBytes, capacity - start)
        let gte = gt[Int(gi % UInt64(gtes))]
        if gte == 0 { return Segment(start: start, length: len, mapping: .unallocated(host: nil)) }
        if gte == 1 && zeroedGrainFlag { return Segment(start: start, length: len, mapping: .zero(host: nil)) }
        let host = UInt64(gte) * 512
        if isCompressed {
            try storage.checkRange(offset: host, length: hasMarkers ? 12 : 1, what: "vmdk compressed grain")
            return Segment(start: start, length: len,
                           mapping: .compressed(CompressedBlock(host: host, size: 0, virtualStart: start, length: Int(len))))
        }
        try storage.checkRange(offset: host, length: len, what: "vmdk grain")
        return Segment(start: start, length: len, mapping: .data(file: fileIndex, host: host))
    }

    /// The compressed bytes of the grain at `host`: after a 12-byte marker (lba, size) with markers.
    func compressedRange(host: UInt64, storage: any ImageStorage) throws -> (UInt64, UInt64) {
        // check() reaches here without segment()'s range check: a grain past the end is an error, not an overflow.
        try storage.checkRange(offset: host, length: 1, what: "vmdk compressed grain")
        guard hasMarkers else { return (host, min(storage.size - host, grainBytes * 2 + 512)) }
        let m = try storage.readBytes(at: host, count: 12, what: "vmdk grain marker")
        let size = UInt64(m.le32(8))
        guard size > 0, size <= grainBytes * 2 + 512 else {
            throw ImageError.invalidField(format: .vmdk, field: "grain marker size at \(host)", value: "\(size)",
                                          reason: "a compressed grain cannot be empty or much larger than the grain")
        }
        try storage.checkRange(offset: host + 12, length: size, what: "vmdk compressed grain")
        return (host + 12, size)
    }

    func decompress(_ block: CompressedBlock, file storage: any ImageStorage, into buffer: UnsafeMutableRawBufferPointer) throws {
        let (off, size) = try compressedRange(host: block.host, storage: storage)
        let src = try storage.readBytes(at: off, count: Int(size), what: "vmdk compressed grain")
        do {
            _ = try src.withUnsafeBytes { try Codec.decompress(.zlib, $0, into: buffer, mustFill: true) }
        } catch let e as Codec.CodecError {
            throw ImageError.decompression(format: .vmdk, offset: block.host, reason: e.reason)
        }
    }

    /// Every table and grain inside the file, none overlapping another. Grain tables are read into one buffer,
    /// not the cache (an inspection must not grow the cache to its limit), and a table whose range overlaps one
    /// already seen is not walked: forged directories point every entry at one table to multiply the work.
    func check(file storage: any ImageStorage, into r: inout CheckResult) throws {
        try HostRangeChecker.run(fileSize: storage.size, into: &r) { c in
            try c.add("header", offset: 0, length: 512)
            if descriptorRange.1 > 0 { try c.add("embedded descriptor", offset: descriptorRange.0, length: descriptorRange.1) }
            try c.add("grain directory", offset: gdOffset * 512, length: UInt64(gd.count) * 4)
            try gd.forEach(notEqualTo: 0) { next, entry in
                let gtOff = UInt64(entry) * 512
                guard try c.add("grain table", next, offset: gtOff, length: UInt64(gtes) * 4) else { return true }
                let gt = try OnDiskTable<UInt32>.load(storage, at: gtOff, count: gtes, bigEndian: false, what: "vmdk grain table")
                try gt.withUnsafeBufferPointer { b in
                    var k = 0
                    while let found = OnDiskTable<UInt32>.firstIndex(in: b, from: k, notEqualTo: 0) {
                        k = found + 1
                        let gte = b[found]
                        if gte == 1 && zeroedGrainFlag { continue }
                        let gi = UInt64(next * gtes + found)
                        guard gi * grainBytes < capacity else {
                            try c.corruption("grain table \(next) entry \(found) maps a grain past the capacity"); continue
                        }
                        let host = UInt64(gte) * 512
                        if isCompressed {
                            do {
                                let (off, size) = try compressedRange(host: host, storage: storage)
                                try c.add("compressed grain", Int(gi), offset: host, length: off - host + size)
                            } catch let e as ImageError {
                                try c.corruption("compressed grain \(gi) at offset \(host): \(e)")
                            }
                        } else {
                            try c.add("grain", Int(gi), offset: host, length: min(grainBytes, capacity - gi * grainBytes))
                        }
                    }
                }
                return true
            }
        }
    }
}
