/// VDI (VirtualBox) version 1.1: a header, a block map of 32-bit entries and 1 MiB blocks. Dynamic and
/// static images; unallocated (0xffffffff) and zero/discarded (0xfffffffe) blocks. See formats/vdi.md.
public final class VDIImage: DiskImage {
    public let format = ImageFormat.vdi
    public let files: [any ImageStorage]
    public let virtualSize: UInt64
    public let imageType: UInt32
    public let blockSize: UInt64
    public let parentUUID: [UInt8]
    public let linkUUID: [UInt8]
    let blockMapOffset: UInt64
    let dataOffset: UInt64
    let blockMap: OnDiskTable<UInt32>

    static let unallocated: UInt32 = 0xffff_ffff
    static let discarded: UInt32 = 0xffff_fffe
    /// qemu's limit: 0x3fffffff blocks.
    static let maxBlocks: UInt64 = 0x3fff_ffff

    public init(storage: any ImageStorage, options: OpenOptions = OpenOptions()) throws {
        func invalid(_ f: String, _ v: Any, _ r: String) -> ImageError {
            .invalidField(format: .vdi, field: f, value: "\(v)", reason: r)
        }
        let h = try storage.readBytes(at: 0, count: 512, what: "vdi header")
        guard h.le32(0x40) == FormatDetector.vdiSignature else { throw invalid("signature", String(h.le32(0x40), radix: 16), "not a VDI image") }
        let version = h.le32(0x44)
        guard version == 0x0001_0001 else {
            throw ImageError.unsupported(format: .vdi, feature: "version \(version >> 16).\(version & 0xffff) (only 1.1 is read)")
        }
        let headerSize = h.le32(72)
        guard (336...448).contains(headerSize) else {
            throw invalid("header size", headerSize, "must be 336 to 448 bytes")
        }
        imageType = h.le32(76)
        guard imageType == 1 || imageType == 2 else {
            throw ImageError.unsupported(format: .vdi, feature: "image type \(imageType) (only dynamic 1 and static 2)")
        }
        blockMapOffset = UInt64(h.le32(340))
        dataOffset = UInt64(h.le32(344))
        guard h.le32(360) == 512 else { throw invalid("sector size", h.le32(360), "must be 512") }
        // VBoxManage can write sizes that are not whole sectors; the partial sector is not part of the disk.
        let diskSize = h.le64(368) / 512 * 512
        blockSize = UInt64(h.le32(376))
        guard blockSize == 1 << 20 else { throw ImageError.unsupported(format: .vdi, feature: "block size \(blockSize) (only 1 MiB)") }
        guard h.le32(380) == 0 else { throw ImageError.unsupported(format: .vdi, feature: "extra data per block") }
        let blocks = UInt64(h.le32(384))
        guard blocks <= Self.maxBlocks else {
            throw ImageError.limitExceeded(format: .vdi, field: "blocks in image", value: blocks, limit: Self.maxBlocks)
        }
        guard diskSize <= blocks * blockSize else {
            throw invalid("disk size", diskSize, "larger than \(blocks) blocks of \(blockSize) bytes")
        }
        // The block map is sized by the disk, never by what the header claims beyond it.
        let neededBlocks = divRoundUp(h.le64(368), blockSize)
        guard blocks <= neededBlocks else {
            throw invalid("blocks in image", blocks, "the block map is larger than a disk of \(h.le64(368)) bytes needs (\(neededBlocks) blocks)")
        }
        if diskSize > options.maxVirtualSize {
            throw ImageError.limitExceeded(format: .vdi, field: "disk size", value: diskSize, limit: options.maxVirtualSize)
        }
        guard blockMapOffset % 512 == 0, dataOffset % 512 == 0 else {
            throw invalid("block map / data offset", "\(blockMapOffset)/\(dataOffset)", "must be sector-aligned")
        }
        linkUUID = Array(h[424..<440])
        parentUUID = Array(h[440..<456])
        virtualSize = diskSize
        try storage.checkRange(offset: blockMapOffset, length: blocks * 4, what: "vdi block map")
        blockMap = try OnDiskTable(storage: storage, offset: blockMapOffset, count: Int(divRoundUp(diskSize, blockSize)),
                                   bigEndian: false, what: "vdi block map")
        files = [storage]
    }

    public var hasParent: Bool { parentUUID.contains { $0 != 0 } }

    /// A differencing VDI reads from its parent.
    public var featureReasons: [SafetyReason] {
        hasParent ? [SafetyReason("vdi-parent", "the VDI names a parent image (UUID \(parentUUID.hex))")] : []
    }

    public func segment(at offset: UInt64, until until_: UInt64) throws -> Segment {
        let bi = Int(offset / blockSize)
        let e = try blockMap[bi]
        let start = UInt64(bi) * blockSize
        let limit = min(blockMap.count, Int(min(divRoundUp(until_, blockSize), UInt64(Int.max))))
        var end = bi + 1
        if e >= Self.discarded {
            end = try blockMap.firstIndex(from: end, to: limit, notEqualTo: e) ?? max(end, limit)
            let len = min(UInt64(end) * blockSize, virtualSize) - start
            return Segment(start: start, length: len, mapping: e == Self.discarded || !hasParent ? .zero(host: nil) : .unallocated(host: nil))
        }
        let host = dataOffset + UInt64(e) * blockSize
        while end < limit, try blockMap[end] == e &+ UInt32(end - bi) { end += 1 }
        let len = min(UInt64(end) * blockSize, virtualSize) - start
        try files[0].checkRange(offset: host, length: len, what: "vdi data block \(bi)")
        return Segment(start: start, length: len, mapping: .data(file: 0, host: host))
    }

    public func info() -> ImageInfo {
        var i = ImageInfo(filename: files[0].name, format: .vdi, virtualSize: virtualSize)
        i.actualSize = files[0].allocatedBytes
        i.clusterSize = blockSize
        return i
    }

    /// Every data block inside the file, none shared with another block or with the header or the map (two
    /// entries naming one data block overlap).
    public func check() throws -> CheckResult {
        var r = CheckResult(filename: files[0].name, format: .vdi)
        try HostRangeChecker.run(fileSize: files[0].size, into: &r) { c in
            try c.add("header", offset: 0, length: 512)
            try c.add("block map", offset: blockMapOffset, length: UInt64(blockMap.count) * 4)
            try blockMap.forEach(notEqualTo: Self.unallocated) { i, e in
                if e < Self.discarded {
                    try c.add("data block", i, offset: dataOffset + UInt64(e) * blockSize, length: blockSize)
                }
                return true
            }
        }
        return r
    }
}
