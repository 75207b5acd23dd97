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
    let blockMap: [UInt32]

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
        let needed = Int(divRoundUp(diskSize, blockSize))
        let raw = try storage.readBytes(at: blockMapOffset, count: needed * 4, what: "vdi block map")
        blockMap = (0..<needed).map { raw.le32($0 * 4) }
        files = [storage]
    }

    public var hasParent: Bool { parentUUID.contains { $0 != 0 } }

    public func segment(at offset: UInt64, until until_: UInt64) throws -> Segment {
        let bi = Int(offset / blockSize)
        let e = blockMap[bi]
        var end = bi + 1
        let start = UInt64(bi) * blockSize
        if e >= Self.discarded {
            while end < blockMap.count && blockMap[end] == e && UInt64(end) * blockSize < until_ { end += 1 }
            let len = min(UInt64(end) * blockSize, virtualSize) - start
            return Segment(start: start, length: len, mapping: e == Self.discarded || !hasParent ? .zero(host: nil) : .unallocated(host: nil))
        }
        let host = dataOffset + UInt64(e) * blockSize
        while end < blockMap.count && blockMap[end] == e &+ UInt32(end - bi) && UInt64(end) * blockSize < until_ { end += 1 }
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

    public func check() throws -> CheckResult {
        var r = CheckResult(filename: files[0].name, format: .vdi)
        var ranges = HostRangeChecker(fileSize: files[0].size)
        ranges.add("header", offset: 0, length: 512)
        ranges.add("block map", offset: blockMapOffset, length: UInt64(blockMap.count) * 4)
        var seen = Set<UInt32>()
        for (i, e) in blockMap.enumerated() where e < Self.discarded {
            if !seen.insert(e).inserted { r.corruption("block \(i) maps to data block \(e), which another block also uses") }
            ranges.add("data block", i, offset: dataOffset + UInt64(e) * blockSize, length: blockSize)
        }
        ranges.report(into: &r)
        return r
    }
}
