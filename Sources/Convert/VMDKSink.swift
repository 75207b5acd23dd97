import SystemIO
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// Writes a VMDK hosted sparse extent: monolithicSparse (header, embedded descriptor, grain directory, all
/// grain tables preallocated as VMware and qemu do, then grains) or streamOptimized (VMware's streaming layout:
/// header with GD_AT_END, descriptor, compressed grains each behind a marker, then a grain-table marker and
/// table after each table's grains, the grain-directory marker and directory, a footer marker, the footer and
/// the end-of-stream marker, so ESXi and OVA imports accept it). Memory: the grain directory and one grain table.
public final class VMDKSink: ImageSink {
    public enum Subformat: String, Sendable { case monolithicSparse, streamOptimized }
    public let subformat: Subformat
    public let unit = 65536
    let file: OutputFile
    let gtes = 512
    var grainSectors: UInt64 { UInt64(unit / 512) }
    var capacitySectors: UInt64 = 0
    var gd: [UInt32] = []
    var gdSector: UInt64 = 0
    var currentGT = -1
    var gt: [UInt32] = []
    var tailSector: UInt64 = 0
    let descriptorSectors: UInt64 = 20
    let cid = UInt32.random(in: 1...UInt32.max - 1)

    public init(path: String, subformat: Subformat) {
        self.subformat = subformat
        self.file = OutputFile(path: path)
    }

    var streamOptimized: Bool { subformat == .streamOptimized }

    func header(gdOffset: UInt64, overhead: UInt64) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        h.put(0, "KDMV")
        h.le32(4, streamOptimized ? 3 : 1)
        h.le32(8, streamOptimized ? (1 | 1 << 16 | 1 << 17) : 1)  // valid newline test (+ compressed, markers)
        h.le64(12, capacitySectors)
        h.le64(20, grainSectors)
        h.le64(28, 1)
        h.le64(36, descriptorSectors)
        h.le32(44, UInt32(gtes))
        h.le64(48, 0)
        h.le64(56, gdOffset)
        h.le64(64, overhead)
        h[73] = 0x0a; h[74] = 0x20; h[75] = 0x0d; h[76] = 0x0a
        h.le16(77, streamOptimized ? 1 : 0)
        return h
    }

    func descriptor() -> [UInt8] {
        let base = file.path.split(separator: "/").last.map(String.init) ?? file.path
        let cyl = min(capacitySectors / (16 * 63), 16383)
        var text = """
        # Disk DescriptorFile
        version=1
        CID=\(hex8(cid))
        parentCID=ffffffff
        createType="\(subformat.rawValue)"

        # Extent description
        RW \(capacitySectors) SPARSE "\(base)"

        # The Disk Data Base
        #DDB

        ddb.virtualHWVersion = "4"
        ddb.geometry.cylinders = "\(cyl)"
        ddb.geometry.heads = "16"
        ddb.geometry.sectors = "63"
        ddb.adapterType = "ide"

        """
        if streamOptimized { text += "ddb.toolsInstallType = \"4\"\n" }
        var b = [UInt8](repeating: 0, count: Int(descriptorSectors) * 512)
        b.put(0, text)
        return b
    }

    public func begin(virtualSize: UInt64) throws {
        capacitySectors = divRoundUp(virtualSize, 512)
        try file.create()
        let gdEntries = Int(divRoundUp(capacitySectors, grainSectors * UInt64(gtes)))
        gd = [UInt32](repeating: 0, count: gdEntries)
        if streamOptimized {
            try file.pwriteAll(header(gdOffset: UInt64.max, overhead: 128), at: 0)
            try file.pwriteAll(descriptor(), at: 512)
            tailSector = 128  // grains start at 64 KiB, as VMware's
        } else {
            // GD at sector 21, then every grain table, then the grains from the next grain boundary.
            gdSector = 1 + descriptorSectors
            let gdSectors = divRoundUp(UInt64(gdEntries) * 4, 512)
            let gtSectors = UInt64(gtes * 4 / 512)
            var next = gdSector + gdSectors
            for i in 0..<gdEntries { gd[i] = UInt32(next); next += gtSectors }
            let overhead = divRoundUp(next, grainSectors) * grainSectors
            tailSector = overhead
            try file.pwriteAll(header(gdOffset: gdSector, overhead: overhead), at: 0)
            try file.pwriteAll(descriptor(), at: 512)
            var gdb = [UInt8](repeating: 0, count: Int(gdSectors) * 512)
            for (i, e) in gd.enumerated() { gdb.le32(i * 4, e) }
            try file.pwriteAll(gdb, at: gdSector * 512)
            try file.truncate(overhead * 512)  // grain tables read as zero (unallocated) until written
        }
        guard tailSector * 512 < UInt64(UInt32.max) * 512 else { throw SinkError.unsupportedOutput("vmdk too large") }
    }

    public func encode(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws -> EncodedRun {
        guard streamOptimized else { return EncodedRun(offset: offset, data: data) }
        var blocks: [[UInt8]] = []
        var i = 0
        while i < data.count {
            let n = min(unit, data.count - i)
            let piece = UnsafeRawBufferPointer(rebasing: data[i..<(i + n)])
            // Grains are whole: the last, partial one is padded with zeros.
            let z = n == unit ? Compressor.zlibStream(piece) : padded(piece, to: unit).withUnsafeBytes { Compressor.zlibStream($0) }
            // Marker (lba, size), the stream, padding to a sector.
            var g = [UInt8](repeating: 0, count: Int(divRoundUp(UInt64(12 + z.count), 512)) * 512)
            g.le64(0, (offset + UInt64(i)) / 512)
            g.le32(8, UInt32(z.count))
            g.replaceSubrange(12..<(12 + z.count), with: z)
            blocks.append(g)
            i += n
        }
        return EncodedRun(offset: offset, data: data, compressed: blocks)
    }

    func switchGT(_ index: Int) throws {
        guard index != currentGT else { return }
        try flushGT()
        currentGT = index
        gt = [UInt32](repeating: 0, count: gtes)
    }

    func flushGT() throws {
        guard currentGT >= 0 else { return }
        var b = [UInt8](repeating: 0, count: gtes * 4)
        for (i, e) in gt.enumerated() { b.le32(i * 4, e) }
        if streamOptimized {
            // Grain-table marker: sectors of metadata that follow, size 0, type 1.
            var m = [UInt8](repeating: 0, count: 512)
            m.le64(0, UInt64(b.count / 512))
            m.le32(12, 1)
            try file.pwriteAll(m + b, at: tailSector * 512)
            gd[currentGT] = UInt32(tailSector + 1)
            tailSector += 1 + UInt64(b.count / 512)
        } else {
            try file.pwriteAll(b, at: UInt64(gd[currentGT]) * 512)
        }
    }

    public func write(_ run: EncodedRun) throws {
        var i = 0, k = 0
        while i < run.data.count {
            let n = min(unit, run.data.count - i)
            let grain = (run.offset + UInt64(i)) / UInt64(unit)
            try switchGT(Int(grain / UInt64(gtes)))
            if let c = run.compressed?[k] {
                try file.pwriteAll(c, at: tailSector * 512)
                gt[Int(grain % UInt64(gtes))] = UInt32(tailSector)
                tailSector += UInt64(c.count / 512)
            } else {
                try file.pwriteAll(UnsafeRawBufferPointer(rebasing: run.data[i..<(i + n)]), at: tailSector * 512)
                gt[Int(grain % UInt64(gtes))] = UInt32(tailSector)
                tailSector += grainSectors
            }
            guard tailSector < UInt64(UInt32.max) else { throw SinkError.unsupportedOutput("vmdk grain offsets overflow 32 bits") }
            i += n
            k += 1
        }
    }

    public func finish() throws {
        try flushGT()
        if streamOptimized {
            // Grain-directory marker and directory, footer marker, footer (the header with the real GD
            // offset), end-of-stream marker.
            var gdb = [UInt8](repeating: 0, count: Int(divRoundUp(UInt64(gd.count) * 4, 512)) * 512)
            for (i, e) in gd.enumerated() { gdb.le32(i * 4, e) }
            var m = [UInt8](repeating: 0, count: 512)
            m.le64(0, UInt64(gdb.count / 512))
            m.le32(12, 2)
            let gdAt = tailSector + 1
            var footerMarker = [UInt8](repeating: 0, count: 512)
            footerMarker.le64(0, 1)
            footerMarker.le32(12, 3)
            let tail = m + gdb + footerMarker + header(gdOffset: gdAt, overhead: 128) + [UInt8](repeating: 0, count: 512)
            try file.pwriteAll(tail, at: tailSector * 512)
            tailSector += UInt64(tail.count / 512)
        } else {
            if tailSector * 512 > 0 { try file.truncate(max(tailSector * 512, 512)) }
        }
        try file.commit()
    }

    public func abort() { file.discard() }
    public var outputFile: OutputFile? { file }
}

func hex8(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 8 - s.count)) + s
}
