import CZlib
import Foundation

/// Large images that are cheap to make: a compressed qcow2 whose every cluster holds the same pattern, written
/// directly (one deflate, copied N times), so a test can have gigabytes of data to convert in a file of a few
/// MiB, made in milliseconds (qemu-img convert -c takes ~35 s for 2 GiB here).
public enum CompressedQcow2 {
    /// A valid qcow2 v3 (64 KiB clusters, zlib) of `clusters` clusters, each 64 KiB of `byte`. qemu-img check
    /// finds it clean; every cluster converts to data.
    public static func make(clusters: Int, byte: UInt8 = 0x5a) -> [UInt8] {
        let cs = 65536
        let plain = [UInt8](repeating: byte, count: cs)
        let packed = deflate(plain)
        precondition(packed.count <= 512, "the pattern must compress into one sector")
        let l2Entries = cs / 8
        let l2Tables = (clusters + l2Entries - 1) / l2Entries
        let l1Clusters = max(1, (l2Tables * 8 + cs - 1) / cs)
        let dataClusters = (clusters * 512 + cs - 1) / cs
        // Layout: header | refcount table | refcount blocks | L1 | L2 tables | compressed data, cluster-aligned.
        var total = 1 + 1 + l1Clusters + l2Tables + dataClusters
        let perBlock = cs / 2  // 16-bit refcounts
        var blocks = (total + perBlock - 1) / perBlock
        total += blocks
        blocks = (total + perBlock - 1) / perBlock
        total = 1 + 1 + blocks + l1Clusters + l2Tables + dataClusters
        let refTable = 1, refBlocks = 2, l1 = 2 + blocks, l2 = l1 + l1Clusters, data = l2 + l2Tables
        var b = [UInt8](repeating: 0, count: total * cs)
        func be32(_ o: Int, _ v: UInt32) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
        func be64(_ o: Int, _ v: UInt64) { for i in 0..<8 { b[o + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
        func be16(_ o: Int, _ v: UInt16) { b[o] = UInt8(v >> 8); b[o + 1] = UInt8(v & 0xff) }
        // Header.
        b.replaceSubrange(0..<4, with: [0x51, 0x46, 0x49, 0xfb])
        be32(4, 3)
        be32(20, 16)
        be64(24, UInt64(clusters * cs))
        be32(36, UInt32(l2Tables))
        be64(40, UInt64(l1 * cs))
        be64(48, UInt64(refTable * cs))
        be32(56, 1)
        be32(96, 4)
        be32(100, 104)
        // Refcounts: metadata clusters 1 each; a data cluster holds 128 compressed clusters.
        for k in 0..<blocks { be64(refTable * cs + k * 8, UInt64((refBlocks + k) * cs)) }
        for c in 0..<total {
            let count: UInt16 = c >= data ? UInt16(min(128, clusters - (c - data) * 128)) : 1
            be16(refBlocks * cs + c * 2, count)
        }
        // L1 and L2 tables; each compressed cluster in its own sector of the data area.
        let shift = 62 - (16 - 8)
        for t in 0..<l2Tables { be64(l1 * cs + t * 8, UInt64((l2 + t) * cs) | 1 << 63) }
        for i in 0..<clusters {
            let host = data * cs + i * 512
            be64((l2 + i / l2Entries) * cs + (i % l2Entries) * 8, 1 << 62 | UInt64(host))
            _ = shift  // one sector: the "additional sectors" field stays 0
            b.replaceSubrange(host..<(host + packed.count), with: packed)
        }
        return b
    }

    /// Raw deflate with qcow2's 4 KiB window.
    static func deflate(_ src: [UInt8]) -> [UInt8] {
        var strm = z_stream()
        precondition(deflateInit2_(&strm, Z_BEST_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY, zlibVersion(),
                                   Int32(MemoryLayout<z_stream>.size)) == Z_OK)
        defer { deflateEnd(&strm) }
        var out = [UInt8](repeating: 0, count: src.count + 1024)
        var input = src
        let n: Int = input.withUnsafeMutableBytes { i in
            out.withUnsafeMutableBytes { o in
                strm.next_in = i.baseAddress?.assumingMemoryBound(to: Bytef.self)
                strm.avail_in = uInt(i.count)
                strm.next_out = o.baseAddress?.assumingMemoryBound(to: Bytef.self)
                strm.avail_out = uInt(o.count)
                precondition(CZlib.deflate(&strm, Z_FINISH) == Z_STREAM_END)
                return o.count - Int(strm.avail_out)
            }
        }
        return Array(out[0..<n])
    }
}
