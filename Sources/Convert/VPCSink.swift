import SystemIO
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// Writes VHD (qemu's `vpc`): dynamic (footer copy, dynamic header, BAT, 2 MiB blocks each behind an all-ones
/// sector bitmap, footer) or fixed (the data, then the footer). Without `force_size` the size is rounded up to
/// a CHS geometry and the creator is "qemu", as qemu-img does; with it the exact size is kept and the creator
/// is "qem2", so qemu-img and Hyper-V read back the same virtual size.
public final class VPCSink: ImageSink {
    public enum Subformat: String, Sendable { case dynamic, fixed }
    public let subformat: Subformat
    public let forceSize: Bool
    public let unit: Int
    let file: OutputFile
    let blockSize: UInt64 = 2 << 20
    let bitmapBytes: UInt64 = 512
    var totalSectors: UInt64 = 0
    var bat: [UInt32] = []
    var batOffset: UInt64 = 1536
    var tail: UInt64 = 0
    var footer: [UInt8] = []

    /// `unit` is the zero-detection granularity (-S, 4 KiB by default): a divisor of the 2 MiB block.
    /// Take clones of the source's blocks (`OutputSpec.copyOffload`).
    let copyOffload: Bool

    public init(path: String, subformat: Subformat, forceSize: Bool, unit: Int = 4096, copyOffload: Bool = false) {
        self.copyOffload = copyOffload
        self.unit = unit
        self.subformat = subformat
        self.forceSize = forceSize
        self.file = OutputFile(path: path)
    }

    /// The VHD specification's CHS algorithm, as qemu implements it.
    static func geometry(_ totalSectors: UInt64) -> (UInt16, UInt8, UInt8) {
        let total = min(totalSectors, 65535 * 16 * 255)
        var spt: UInt64, heads: UInt64, cth: UInt64
        if total >= 65535 * 16 * 63 {
            spt = 255; heads = 16; cth = total / spt
        } else {
            spt = 17
            cth = total / spt
            heads = max(4, (cth + 1023) / 1024)
            if cth >= heads * 1024 || heads > 16 { spt = 31; heads = 16; cth = total / spt }
            if cth >= heads * 1024 { spt = 63; heads = 16; cth = total / spt }
        }
        return (UInt16(min(cth / heads, 65535)), UInt8(heads), UInt8(spt))
    }

    public func begin(virtualSize: UInt64) throws {
        var sectors = divRoundUp(virtualSize, 512)
        var (c, h, s) = Self.geometry(sectors)
        if !forceSize {
            // Round up until the geometry holds the whole disk, as qemu-img does (it never truncates).
            var i: UInt64 = 0
            while sectors > UInt64(c) * UInt64(h) * UInt64(s) && i < 1 << 20 {
                i += 1
                (c, h, s) = Self.geometry(sectors + i)
            }
            let chs = UInt64(c) * UInt64(h) * UInt64(s)
            if chs != 65535 * 16 * 255 { sectors = max(sectors, chs) }
        }
        guard sectors <= 0xff00_0000 else {
            throw SinkError.unsupportedOutput("vpc images hold at most 2040 GiB; this one is \(sectors * 512) bytes")
        }
        totalSectors = sectors
        let size = sectors * 512
        var f = [UInt8](repeating: 0, count: 512)
        f.put(0, "conectix")
        f.be32(8, 2)
        f.be32(12, 0x0001_0000)
        f.be64(16, subformat == .fixed ? UInt64.max : 512)
        let since2000 = UInt64(max(0, time(nil) - 946_684_800))
        f.be32(24, UInt32(truncatingIfNeeded: since2000))
        f.put(28, forceSize ? "qem2" : "qemu")
        f.be32(32, 0x0005_0003)
        f.put(36, "Wi2k")
        f.be64(40, size)
        f.be64(48, size)
        f.be16(56, c); f[58] = h; f[59] = s
        f.be32(60, subformat == .fixed ? VPCImage.fixed : VPCImage.dynamic)
        f.replaceSubrange(68..<84, with: randomBytes(16))
        f.be32(64, VPCImage.checksum(f, skipping: 64..<68))
        footer = f
        try file.create()
        if subformat == .fixed {
            try file.truncate(size)
            return
        }
        let entries = Int(divRoundUp(size, blockSize))
        bat = [UInt32](repeating: 0xffff_ffff, count: entries)
        var d = [UInt8](repeating: 0, count: 1024)
        d.put(0, "cxsparse")
        d.be64(8, UInt64.max)
        d.be64(16, batOffset)
        d.be32(24, 0x0001_0000)
        d.be32(28, UInt32(entries))
        d.be32(32, UInt32(blockSize))
        d.be32(36, VPCImage.checksum(d, skipping: 36..<40))
        try file.pwriteAll(footer, at: 0)
        try file.pwriteAll(d, at: 512)
        tail = batOffset + divRoundUp(UInt64(entries) * 4, 512) * 512
    }

    public func write(_ run: EncodedRun) throws {
        if subformat == .fixed {
            try file.submit(run.data, at: run.offset)
            return
        }
        try run.forEachBlockPiece(blockSize) { bi, inBlock, piece in
            try file.submit(piece, at: blockData(bi) + inBlock)
        }
    }

    /// Where block `bi`'s data starts in the file, allocating the block at the end on first use: an all-ones
    /// bitmap (every sector present), then the data, on `sinkDataAlignment` (the bitmap takes the sector before).
    func blockData(_ bi: Int) throws -> UInt64 {
        if bat[bi] == 0xffff_ffff {
            tail = divRoundUp(tail + bitmapBytes, sinkDataAlignment) * sinkDataAlignment - bitmapBytes
            bat[bi] = UInt32(tail / 512)
            try file.pwriteAll([UInt8](repeating: 0xff, count: Int(bitmapBytes)), at: tail)
            tail += bitmapBytes + blockSize
        }
        return UInt64(bat[bi]) * 512 + bitmapBytes
    }

    public func finish() throws {
        if subformat == .fixed {
            try file.pwriteAll(footer, at: totalSectors * 512)
        } else {
            var b = [UInt8](repeating: 0xff, count: Int(divRoundUp(UInt64(bat.count) * 4, 512)) * 512)
            for (i, e) in bat.enumerated() { b.be32(i * 4, e) }
            try file.pwriteAll(b, at: batOffset)
            try file.truncate(tail)  // unwritten parts of the last block read as zero
            try file.pwriteAll(footer, at: tail)
        }
        try file.commit()
    }

    public func abort() { file.discard() }
    public var outputFile: OutputFile? { file }
}

extension VPCSink: ExtentCloningSink {
    public func cloneAlignment(from source: FileStorage) -> UInt64? {
        copyOffload ? cloneAlignment(of: file, from: source, dataAlignment: sinkDataAlignment) : nil
    }

    public func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws {
        try cloneThroughBlocks(from: source, at: hostOffset, length: length, to: offset, blockSize: blockSize, into: file) { bi in
            subformat == .fixed ? bi * blockSize : try blockData(Int(bi))
        }
    }
}

/// Writes VDI 1.1: a 512-byte header, the block map, then 1 MiB blocks. Dynamic images allocate a block on its
/// first write (in order), static ones map every block in place. The block map is written as blocks are
/// allocated, so memory does not grow with the disk.
public final class VDISink: ImageSink {
    public let isStatic: Bool
    public let unit: Int
    let file: OutputFile
    let blockSize: UInt64 = 1 << 20
    var virtualSize: UInt64 = 0
    var blocks: UInt64 = 0
    var allocated: UInt32 = 0
    var lastBlock = -1
    let bmapOffset: UInt64 = 512
    var dataOffset: UInt64 = 0

    /// `unit` is the zero-detection granularity (-S, 4 KiB by default): a divisor of the 1 MiB block.
    /// Take clones of the source's blocks (`OutputSpec.copyOffload`).
    let copyOffload: Bool

    public init(path: String, isStatic: Bool, unit: Int = 4096, copyOffload: Bool = false) {
        self.copyOffload = copyOffload
        self.unit = unit
        self.isStatic = isStatic
        self.file = OutputFile(path: path)
    }

    func header() -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        h.put(0, "<<< QEMU VM Virtual Disk Image >>>\n")
        h.le32(0x40, 0xbeda_107f)
        h.le32(0x44, 0x0001_0001)
        h.le32(0x48, 400)
        h.le32(0x4c, isStatic ? 2 : 1)
        h.le32(0x154, UInt32(bmapOffset))
        h.le32(0x158, UInt32(dataOffset))
        h.le32(0x168, 512)
        h.le64(0x170, virtualSize)
        h.le32(0x178, UInt32(blockSize))
        h.le32(0x180, UInt32(blocks))
        h.le32(0x184, allocated)
        h.replaceSubrange(0x188..<0x198, with: uuid)
        return h
    }
    let uuid = randomBytes(16)

    public func begin(virtualSize: UInt64) throws {
        // VDI stores whole sectors.
        self.virtualSize = divRoundUp(virtualSize, 512) * 512
        blocks = divRoundUp(self.virtualSize, blockSize)
        guard blocks <= 0x3fff_ffff else { throw SinkError.unsupportedOutput("vdi images hold at most 0x3fffffff blocks") }
        // The data on `sinkDataAlignment` (qemu puts it at the next sector): direct writes and clones need it.
        dataOffset = divRoundUp(bmapOffset + blocks * 4, sinkDataAlignment) * sinkDataAlignment
        try file.create()
        // The block map: every block unallocated (dynamic) or mapped in place (static), 1 MiB at a time.
        var i: UInt64 = 0
        while i < blocks {
            let n = min(blocks - i, 1 << 18)
            var b = [UInt8](repeating: 0xff, count: Int(n) * 4)
            if isStatic { for k in 0..<Int(n) { b.le32(k * 4, UInt32(i) + UInt32(k)) } }
            try file.pwriteAll(b, at: bmapOffset + i * 4)
            i += n
        }
        if isStatic {
            allocated = UInt32(blocks)
            try file.truncate(dataOffset + blocks * blockSize)
        } else {
            try file.truncate(dataOffset)
        }
    }

    public func write(_ run: EncodedRun) throws {
        try run.forEachBlockPiece(blockSize) { bi, inBlock, piece in
            try file.submit(piece, at: blockData(bi) + inBlock)
        }
    }

    /// Where block `bi`'s data starts in the file; a dynamic image allocates it on first use.
    func blockData(_ bi: Int) throws -> UInt64 {
        if isStatic { return dataOffset + UInt64(bi) * blockSize }
        if bi != lastBlock {
            // Runs (and clones) arrive in increasing order, so a block is new exactly when it differs from the last.
            var e = [UInt8](repeating: 0, count: 4)
            e.le32(0, allocated)
            try file.pwriteAll(e, at: bmapOffset + UInt64(bi) * 4)
            allocated += 1
            lastBlock = bi
        }
        return dataOffset + UInt64(allocated - 1) * blockSize
    }

    public func finish() throws {
        if !isStatic { try file.truncate(dataOffset + UInt64(allocated) * blockSize) }
        try file.pwriteAll(header(), at: 0)
        try file.commit()
    }

    public func abort() { file.discard() }
    public var outputFile: OutputFile? { file }
}

extension VDISink: ExtentCloningSink {
    public func cloneAlignment(from source: FileStorage) -> UInt64? {
        copyOffload ? cloneAlignment(of: file, from: source, dataAlignment: sinkDataAlignment) : nil
    }

    public func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws {
        try cloneThroughBlocks(from: source, at: hostOffset, length: length, to: offset, blockSize: blockSize, into: file) {
            try blockData(Int($0))
        }
    }
}
