import SystemIO
import ImageFormats

/// Writes qcow2 (v3 by default, v2 with compat=0.10): header, L1 table, then data clusters and L2 tables in
/// the order the converter hands them over, and the refcount table and blocks at the end, so refcounts are
/// exact (qemu-img check is clean). Memory: the L1 table, one L2 table, and a 16-bit refcount per host
/// cluster of the output (2 bytes per 64 KiB written).
public final class QCOW2Sink: ImageSink {
    public struct Options: Sendable {
        public var version: UInt32 = 3
        public var clusterBits = 16
        public var compression: Compression = .none
        public var refcountBits = 16
        public var lazyRefcounts = false
        /// An overlay: reads of unallocated clusters go to this file (Nova's instance disk over `_base/<sha1>`).
        /// Only our own trusted bases are ever named here; the reader refuses backing files in images it opens.
        public var backingFile: String?
        /// Written as the backing-format header extension, so nothing probes the base's format.
        public var backingFormat: String?
        /// Take clones of the source's clusters (`OutputSpec.copyOffload`).
        public var copyOffload = false
        public enum Compression: Sendable { case none, zlib, zstd }
        public init() {}
    }

    public let options: Options
    public var unit: Int { 1 << options.clusterBits }
    let file: OutputFile
    var cs: UInt64 { UInt64(unit) }
    var virtualSize: UInt64 = 0
    var l1: [UInt64] = []
    var l1Clusters: UInt64 = 0
    var l2Index = -1
    var l2: [UInt64] = []
    var l2Host: UInt64 = 0
    /// Next free byte (compressed data is packed at byte granularity; other allocations are cluster-aligned).
    var tail: UInt64 = 0
    var refcounts: [UInt16] = []

    /// Writes the zstd compression type in the header even when no cluster is compressed (`-o compression_type=zstd` without -c).
    let zstdHeader: Bool

    public init(path: String, options: Options = Options(), zstdHeader: Bool = false) throws {
        self.zstdHeader = zstdHeader || options.compression == .zstd
        guard (9...21).contains(options.clusterBits) else {
            throw SinkError.invalidOption("cluster_size must be a power of two from 512 B to 2 MiB")
        }
        guard [1, 2, 4, 8, 16, 32, 64].contains(options.refcountBits) else {
            throw SinkError.invalidOption("refcount_bits must be a power of two up to 64")
        }
        if options.version == 2 {
            guard options.refcountBits == 16 else { throw SinkError.invalidOption("compat=0.10 requires refcount_bits=16") }
            guard options.compression != .zstd && !zstdHeader else { throw SinkError.invalidOption("compression_type=zstd requires compat=1.1") }
            guard !options.lazyRefcounts else { throw SinkError.invalidOption("lazy_refcounts requires compat=1.1") }
        }
        self.options = options
        self.file = OutputFile(path: path)
    }

    /// The largest image this writer makes: the largest virtual size imgconv reads (64 TiB), so the L1 table it
    /// holds in memory stays small (128 Ki entries, 1 MiB, at 64 KiB clusters) whatever a caller asks for.
    public static let maxVirtualSize: UInt64 = OpenOptions().maxVirtualSize

    public func begin(virtualSize: UInt64) throws {
        guard virtualSize <= Self.maxVirtualSize else {
            throw SinkError.invalidOption("a qcow2 of \(virtualSize) bytes: the largest is \(Self.maxVirtualSize)")
        }
        let l2Entries = cs / 8
        let l1Entries = divRoundUp(virtualSize, cs * l2Entries)
        guard l1Entries * 8 <= QCOW2Image.maxL1Bytes else {
            throw SinkError.invalidOption("a qcow2 of \(virtualSize) bytes needs an L1 table over 32 MiB at this cluster size")
        }
        self.virtualSize = virtualSize
        try file.create()
        l1 = [UInt64](repeating: 0, count: Int(l1Entries))
        l1Clusters = max(1, divRoundUp(l1Entries * 8, cs))
        tail = (1 + l1Clusters) * cs
        refcounts = [UInt16](repeating: 1, count: Int(1 + l1Clusters))
    }

    func reference(_ offset: UInt64, _ length: UInt64) throws {
        let last = Int((offset + length - 1) / cs)
        if last >= refcounts.count { refcounts += [UInt16](repeating: 0, count: last + 1 - refcounts.count) }
        for c in Int(offset / cs)...last {
            refcounts[c] += 1
            if options.refcountBits < 16 && UInt64(refcounts[c]) >= (1 << UInt64(options.refcountBits)) {
                throw SinkError.invalidOption("refcount_bits=\(options.refcountBits) is too small for compressed clusters; use 16")
            }
        }
    }

    /// A new cluster-aligned cluster at the end.
    func allocateCluster() throws -> UInt64 {
        let host = divRoundUp(tail, cs) * cs
        tail = host + cs
        try reference(host, cs)
        return host
    }

    public func encode(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws -> EncodedRun {
        guard options.compression != .none else { return EncodedRun(offset: offset, data: data) }
        var blocks: [[UInt8]] = []
        var i = 0
        while i < data.count {
            let n = min(unit, data.count - i)
            let piece = UnsafeRawBufferPointer(rebasing: data[i..<(i + n)])
            let whole = n == unit ? nil : padded(piece, to: unit)
            let compress = { (b: UnsafeRawBufferPointer) -> [UInt8]? in
                self.options.compression == .zstd ? Compressor.zstd(b, limit: self.unit - 1)
                    : Compressor.qcow2Deflate(b, limit: self.unit - 1)
            }
            // An empty array means "did not compress: store the cluster as is".
            blocks.append((whole.map { w in w.withUnsafeBytes { compress($0) } } ?? compress(piece)) ?? [])
            i += n
        }
        return EncodedRun(offset: offset, data: data, compressed: blocks)
    }

    func switchL2(to index: Int) throws {
        guard index != l2Index else { return }
        try flushL2()
        l2Index = index
        l2 = [UInt64](repeating: 0, count: unit / 8)
        l2Host = try allocateCluster()
        l1[index] = l2Host | QCOW2Image.copiedFlag
    }

    func flushL2() throws {
        guard l2Index >= 0 else { return }
        var b = [UInt8](repeating: 0, count: unit)
        for (i, e) in l2.enumerated() where e != 0 { b.be64(i * 8, e) }
        try file.pwriteAll(b, at: l2Host)
    }

    public func write(_ run: EncodedRun) throws {
        let l2Entries = UInt64(unit / 8)
        var i = 0
        var k = 0
        // Uncompressed clusters of one run go out in one pwrite per L2 table: they are contiguous on the host.
        var pendingStart = -1
        var pendingHost: UInt64 = 0
        func flushPending(_ end: Int) throws {
            guard pendingStart >= 0 else { return }
            try file.submit(UnsafeRawBufferPointer(rebasing: run.data[pendingStart..<end]), at: pendingHost)
            pendingStart = -1
        }
        while i < run.data.count {
            let n = min(unit, run.data.count - i)
            let vcl = (run.offset + UInt64(i)) / cs
            let index = Int(vcl / l2Entries)
            if index != l2Index { try flushPending(i); try switchL2(to: index) }
            let slot = Int(vcl % l2Entries)
            if let c = run.compressed?[k], !c.isEmpty {
                try flushPending(i)
                let host = tail
                try c.withUnsafeBytes { try file.pwriteAll($0, at: host) }
                try reference(host, UInt64(c.count))
                tail = host + UInt64(c.count)
                let shift = UInt64(62 - (options.clusterBits - 8))
                let sectors = ((host + UInt64(c.count) - 1) >> 9) - (host >> 9)
                l2[slot] = QCOW2Image.compressedFlag | host | (sectors << shift)
            } else {
                // A cluster a refused clone already allocated is written where it was allocated (never leaked).
                let host = try l2[slot] & QCOW2Image.compressedFlag == 0 && l2[slot] != 0
                    ? l2[slot] & ~QCOW2Image.copiedFlag : allocateCluster()
                if pendingStart < 0 || pendingHost + UInt64(i - pendingStart) != host {
                    try flushPending(i)
                    pendingStart = i
                    pendingHost = host
                }
                l2[slot] = host | QCOW2Image.copiedFlag
            }
            i += n
            k += 1
        }
        try flushPending(run.data.count)
    }

    public func finish() throws {
        try flushL2()
        // The refcount blocks and table go after everything else; size them so they also count themselves.
        let perBlock = UInt64(unit * 8 / options.refcountBits)
        let used = divRoundUp(tail, cs)
        var blocks: UInt64 = 1, tableClusters: UInt64 = 1
        while true {
            let total = used + blocks + tableClusters
            let needBlocks = divRoundUp(total, perBlock)
            let needTable = divRoundUp(needBlocks * 8, cs)
            if needBlocks <= blocks && needTable <= tableClusters { break }
            blocks = max(blocks, needBlocks)
            tableClusters = max(tableClusters, needTable)
        }
        let blocksStart = used * cs
        let tableStart = blocksStart + blocks * cs
        tail = tableStart + tableClusters * cs
        try reference(blocksStart, (blocks + tableClusters) * cs)
        // Refcount blocks.
        for b in 0..<blocks {
            var block = [UInt8](repeating: 0, count: unit)
            let first = Int(b * perBlock)
            for j in 0..<Int(perBlock) where first + j < refcounts.count {
                let v = UInt64(refcounts[first + j])
                guard v != 0 else { continue }
                switch options.refcountBits {
                case 1, 2, 4:
                    block[j * options.refcountBits / 8] |= UInt8(v) << UInt8((j * options.refcountBits) % 8)
                case 8: block[j] = UInt8(v)
                case 16: block.be16(j * 2, UInt16(v))
                case 32: block.be32(j * 4, UInt32(v))
                default: block.be64(j * 8, v)
                }
            }
            try file.pwriteAll(block, at: blocksStart + b * cs)
        }
        var table = [UInt8](repeating: 0, count: Int(tableClusters * cs))
        for b in 0..<blocks { table.be64(Int(b) * 8, blocksStart + b * cs) }
        try file.pwriteAll(table, at: tableStart)
        // L1 table.
        var l1b = [UInt8](repeating: 0, count: Int(l1Clusters * cs))
        for (i, e) in l1.enumerated() { l1b.be64(i * 8, e) }
        try file.pwriteAll(l1b, at: cs)
        // Header.
        var h = [UInt8](repeating: 0, count: 112)
        h[0] = 0x51; h[1] = 0x46; h[2] = 0x49; h[3] = 0xfb
        h.be32(4, options.version)
        h.be32(20, UInt32(options.clusterBits))
        h.be64(24, virtualSize)
        h.be32(36, UInt32(l1.count))
        h.be64(40, cs)
        h.be64(48, tableStart)
        h.be32(56, UInt32(tableClusters))
        if options.version == 3 {
            h.be64(72, zstdHeader ? QCOW2Image.compressionTypeBit : 0)
            h.be64(80, options.lazyRefcounts ? 1 : 0)
            h.be32(96, UInt32(options.refcountBits.trailingZeroBitCount))
            h.be32(100, 112)
            h[104] = zstdHeader ? 1 : 0
        } else {
            h.removeLast(112 - 72)
        }
        // Header extensions (the backing format), their end marker, then the backing file name: all in cluster 0.
        if let backing = options.backingFile {
            var ext: [UInt8] = []
            if let fmt = options.backingFormat {
                var e = [UInt8](repeating: 0, count: 8)
                e.be32(0, 0xE279_2ACA)
                e.be32(4, UInt32(fmt.utf8.count))
                e += Array(fmt.utf8)
                while e.count % 8 != 0 { e.append(0) }
                ext += e
            }
            ext += [UInt8](repeating: 0, count: 8)
            let name = Array(backing.utf8)
            guard h.count + ext.count + name.count <= unit, name.count <= 1023 else {
                throw SinkError.invalidOption("backing file name '\(backing.prefix(80))' is too long for the header cluster")
            }
            h.be64(8, UInt64(h.count + ext.count))
            h.be32(16, UInt32(name.count))
            h += ext + name
        }
        try file.pwriteAll(h, at: 0)
        try file.truncate(tail)
        try file.commit()
    }

    public func abort() { file.discard() }
    public var outputFile: OutputFile? { file }
}

extension QCOW2Sink: ExtentCloningSink {
    /// With `copyOffload`: uncompressed output with clusters of at least a file-system block.
    public func cloneAlignment(from source: FileStorage) -> UInt64? {
        guard options.copyOffload, options.compression == .none else { return nil }
        return cloneAlignment(of: file, from: source, dataAlignment: cs)
    }

    /// Allocates the run's clusters as `write` would (reusing one an earlier run of the same cluster allocated)
    /// and clones the source into them.
    public func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws {
        let l2Entries = UInt64(unit / 8)
        try cloneThroughBlocks(from: source, at: hostOffset, length: length, to: offset, blockSize: cs, into: file) { vcl in
            try switchL2(to: Int(vcl / l2Entries))
            let slot = Int(vcl % l2Entries)
            if l2[slot] == 0 { l2[slot] = try allocateCluster() | QCOW2Image.copiedFlag }
            return l2[slot] & ~QCOW2Image.copiedFlag
        }
    }
}
