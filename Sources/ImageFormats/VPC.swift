/// VPC / VHD: fixed (footer only, at the end), dynamic (footer copy at 0, dynamic header, BAT, blocks of a
/// sector bitmap followed by data) and differencing (parent reported, never followed). See formats/vpc.md.
public final class VPCImage: DiskImage {
    public let format = ImageFormat.vpc
    public let files: [any ImageStorage]
    public let virtualSize: UInt64
    public let diskType: UInt32
    public let creatorApp: String
    public let footerChecksumValid: Bool
    public let parentName: String?
    public let parentUUID: [UInt8]?
    /// Any of the eight parent locator entries is in use (they hold host paths of the parent).
    public let hasParentLocators: Bool
    /// Dynamic and differencing disks.
    let blockSize: UInt64
    let bitmapBytes: UInt64
    let bat: OnDiskTable<UInt32>?
    /// Entries the header declares (the table on disk may be longer than the disk needs only up to what
    /// current_size needs).
    let batEntries: UInt64
    let batOffset: UInt64
    let dynamicHeaderOffset: UInt64
    let bitmapCache: TableCache<[UInt8]>

    public static let fixed: UInt32 = 2, dynamic: UInt32 = 3, differencing: UInt32 = 4
    /// qemu's VHD_MAX_SECTORS: 2040 GiB.
    static let maxSectors: UInt64 = 0xff00_0000
    /// The largest CHS geometry (65535 x 16 x 255): images this big use current_size.
    static let maxGeometrySectors: UInt64 = 65535 * 16 * 255
    static let unallocated: UInt32 = 0xffff_ffff

    /// The footer checksum: the one's complement of the byte sum, with the checksum field counted as zero.
    public static func checksum(_ b: [UInt8], skipping field: Range<Int>) -> UInt32 {
        var sum: UInt32 = 0
        for (i, v) in b.enumerated() where !field.contains(i) { sum &+= UInt32(v) }
        return ~sum
    }

    static func footerChecksumValid(_ f: [UInt8]) -> Bool {
        f.count >= 512 && checksum(Array(f[0..<512]), skipping: 64..<68) == f.be32(64)
    }

    public init(storage: any ImageStorage, options: OpenOptions = OpenOptions()) throws {
        func invalid(_ f: String, _ v: Any, _ r: String) -> ImageError {
            .invalidField(format: .vpc, field: f, value: "\(v)", reason: r)
        }
        let size = storage.size
        guard size >= 512 else { throw ImageError.pastEndOfFile(what: "vhd footer", offset: 0, length: 512, fileSize: size) }
        var footer = try storage.readBytes(at: 0, count: 512, what: "vhd footer copy")
        var atStart = true
        if !footer.hasPrefix(FormatDetector.vpcCookie) {
            footer = try storage.readBytes(at: size - 512, count: 512, what: "vhd footer")
            atStart = false
            guard footer.hasPrefix(FormatDetector.vpcCookie) else { throw invalid("cookie", footer[0..<8].hex, "no VHD footer") }
        }
        footerChecksumValid = Self.footerChecksumValid(footer)
        guard footerChecksumValid else {
            throw invalid("footer checksum", String(footer.be32(64), radix: 16),
                          "expected \(String(Self.checksum(footer, skipping: 64..<68), radix: 16)); the footer is corrupt")
        }
        diskType = footer.be32(60)
        guard diskType == Self.fixed || diskType == Self.dynamic || diskType == Self.differencing else {
            throw invalid("disk type", diskType, "must be 2 (fixed), 3 (dynamic) or 4 (differencing)")
        }
        if diskType == Self.fixed && atStart && size > 512 {
            // A fixed disk has its footer only at the end; a copy at the start is the dynamic layout.
            let end = try storage.readBytes(at: size - 512, count: 512, what: "vhd footer")
            if !end.hasPrefix(FormatDetector.vpcCookie) { throw invalid("disk type", diskType, "a fixed disk must end with its footer") }
        }
        let app = Array(footer[28..<32])
        creatorApp = String(decoding: app.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
        // The virtual size, by qemu's rules: CHS geometry for Virtual PC and old qemu images, current_size for
        // Hyper-V, disk2vhd, XenServer, XenConverter and qemu's 'qem2', and for the maximum geometry.
        var sectors = UInt64(footer.be16(56)) * UInt64(footer[58]) * UInt64(footer[59])
        let usesCurrentSize = [Array("win ".utf8), Array("qem2".utf8), Array("d2v ".utf8), Array("CTXS".utf8),
                               [0x74, 0x61, 0x70, 0x00]].contains(app)
        if usesCurrentSize || sectors == Self.maxGeometrySectors {
            sectors = footer.be64(48) / 512
        }
        guard sectors <= Self.maxSectors else {
            throw ImageError.limitExceeded(format: .vpc, field: "size in sectors", value: sectors, limit: Self.maxSectors)
        }
        virtualSize = sectors * 512
        if virtualSize > options.maxVirtualSize {
            throw ImageError.limitExceeded(format: .vpc, field: "size", value: virtualSize, limit: options.maxVirtualSize)
        }
        files = [storage]

        if diskType == Self.fixed {
            guard virtualSize <= size - 512 else {
                throw ImageError.pastEndOfFile(what: "vhd fixed disk data", offset: 0, length: virtualSize, fileSize: size)
            }
            blockSize = 0; bitmapBytes = 0; bat = nil; batEntries = 0; batOffset = 0; dynamicHeaderOffset = 0
            parentName = nil; parentUUID = nil; hasParentLocators = false
            bitmapCache = TableCache(capacityBytes: 0, tableBytes: 1)
            return
        }
        dynamicHeaderOffset = footer.be64(16)
        let d = try storage.readBytes(at: dynamicHeaderOffset, count: 1024, what: "vhd dynamic disk header")
        guard d.hasPrefix(Array("cxsparse".utf8)) else { throw invalid("dynamic header cookie", d[0..<8].hex, "expected cxsparse") }
        let bs = UInt64(d.be32(32))
        guard isPowerOfTwo(bs), bs >= 512, bs <= 256 << 20 else {
            throw invalid("block size", bs, "must be a power of two from 512 bytes to 256 MiB")
        }
        blockSize = bs
        bitmapBytes = (bs / (8 * 512) + 511) / 512 * 512
        let entries = UInt64(d.be32(28))
        guard entries * bs >= virtualSize else {
            throw invalid("max table entries", entries, "the BAT covers less than the virtual size \(virtualSize)")
        }
        // The table is sized by the disk: the larger of the geometry's size and current_size (Virtual PC sizes
        // the BAT by current_size and the disk by its geometry), never by what the header claims beyond that.
        let declaredBytes = max(virtualSize, min(footer.be64(48), Self.maxSectors * 512))
        let allowed = max(divRoundUp(declaredBytes, bs), divRoundUp(virtualSize, bs))
        guard entries <= allowed else {
            throw invalid("max table entries", entries, "the BAT is larger than a disk of \(declaredBytes) bytes needs (\(allowed) entries of \(bs) bytes)")
        }
        batEntries = entries
        batOffset = d.be64(16)
        // Only the entries that map the virtual disk are used; the whole declared table must lie in the file.
        try storage.checkRange(offset: batOffset, length: entries * 4, what: "vhd block allocation table")
        bat = try OnDiskTable(storage: storage, offset: batOffset, count: Int(divRoundUp(virtualSize, bs)), bigEndian: true,
                              what: "vhd block allocation table")
        hasParentLocators = (0..<8).contains { d.be32(576 + $0 * 24) != 0 }
        if diskType == Self.differencing {
            parentUUID = Array(d[40..<56])
            var units: [UInt16] = []
            for i in 0..<256 { let u = d.be16(64 + i * 2); if u == 0 { break }; units.append(u) }
            parentName = String(decoding: units, as: UTF16.self)
        } else {
            parentName = nil; parentUUID = nil
        }
        bitmapCache = TableCache(capacityBytes: options.metadataCacheBytes / 8, tableBytes: Int(bitmapBytes))
    }

    /// How absent sectors read: zero on a dynamic disk (qemu reports them present and zero), and from the
    /// never-opened parent on a differencing disk.
    var absent: Mapping { diskType == Self.differencing ? .unallocated(host: nil) : .zero(host: nil) }

    public func segment(at offset: UInt64, until until_: UInt64) throws -> Segment {
        if diskType == Self.fixed {
            let (isData, end) = try files[0].allocation(at: offset)
            let len = max(1, min(end, virtualSize) - offset)
            return Segment(start: offset, length: len, mapping: isData ? .data(file: 0, host: offset) : .zero(host: offset))
        }
        let bat = self.bat!
        let bi = Int(offset / blockSize)
        let blockStart = UInt64(bi) * blockSize
        let blockLen = min(blockSize, virtualSize - blockStart)
        let entry = try bat[bi]
        if entry == Self.unallocated {
            // Merge runs of unallocated blocks so a huge empty disk maps in few steps.
            let limit = min(bat.count, Int(min(divRoundUp(until_, blockSize), UInt64(Int.max))))
            let end = try bat.firstIndex(from: bi + 1, to: limit, notEqualTo: Self.unallocated) ?? max(bi + 1, limit)
            return Segment(start: blockStart, length: min(UInt64(end) * blockSize, virtualSize) - blockStart,
                           mapping: absent)
        }
        let bitmapOffset = UInt64(entry) * 512
        let dataOffset = bitmapOffset + bitmapBytes
        try files[0].checkRange(offset: bitmapOffset, length: bitmapBytes + blockLen, what: "vhd data block \(bi)")
        // The sector bitmap: a set bit means the sector holds data; a clear one reads as zero here
        // (for a differencing disk it would come from the parent, which imgconv never opens).
        let bitmap = try bitmapCache.table(at: bitmapOffset) {
            try files[0].readBytes(at: bitmapOffset, count: Int(bitmapBytes), what: "vhd sector bitmap")
        }
        func present(_ s: UInt64) -> Bool { bitmap[Int(s / 8)] & (0x80 >> UInt8(s % 8)) != 0 }
        let firstSector = (offset - blockStart) / 512
        let sectorsInBlock = divRoundUp(blockLen, 512)
        let p = present(firstSector)
        var last = firstSector
        while last + 1 < sectorsInBlock && present(last + 1) == p { last += 1 }
        let start = blockStart + firstSector * 512
        let end = min(blockStart + (last + 1) * 512, blockStart + blockLen)
        let host = dataOffset + firstSector * 512
        return Segment(start: start, length: end - start,
                       mapping: p ? .data(file: 0, host: host) : absent)
    }

    /// A differencing disk reads from its parent; parent locators hold host paths.
    public var featureReasons: [SafetyReason] {
        var out: [SafetyReason] = []
        if diskType == Self.differencing {
            out.append(SafetyReason("vhd-parent", "a differencing VHD reads from parent '\(parentName ?? "")'"))
        }
        if hasParentLocators {
            out.append(SafetyReason("vhd-parent-locator", "the dynamic header carries parent locators (host paths)"))
        }
        return out
    }

    public func info() -> ImageInfo {
        var i = ImageInfo(filename: files[0].name, format: .vpc, virtualSize: virtualSize)
        i.actualSize = files[0].allocatedBytes
        if diskType != Self.fixed { i.clusterSize = blockSize }
        if let parentName { i.backingFilename = parentName }
        return i
    }

    /// Every block (its sector bitmap and data) inside the file, none overlapping another block, the headers,
    /// the BAT or the footer.
    public func check() throws -> CheckResult {
        var r = CheckResult(filename: files[0].name, format: .vpc)
        guard diskType != Self.fixed, let bat else { return r }
        let size = files[0].size
        try HostRangeChecker.run(fileSize: size, into: &r) { c in
            try c.add("footer copy", offset: 0, length: 512)
            try c.add("dynamic disk header", offset: dynamicHeaderOffset, length: 1024)
            try c.add("block allocation table", offset: batOffset, length: batEntries * 4)
            try c.add("footer", offset: size - 512, length: 512)
            try bat.forEach(notEqualTo: Self.unallocated) { i, e in
                try c.add("block", i, offset: UInt64(e) * 512, length: bitmapBytes + blockSize)
                return true
            }
        }
        return r
    }
}
