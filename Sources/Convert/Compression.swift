import CDeflate
import CZlib
import CZstd

/// Whole-cluster compression for the writers.
enum Compressor {
    /// qcow2's "zlib": raw deflate with a 4 KiB window (windowBits -12), which is what qemu writes and all
    /// that qemu's reader (inflateInit2(-12)) accepts. libdeflate cannot limit its window, so this is zlib.
    /// Returns nil when the output would not fit in `limit` bytes (the cluster is then stored uncompressed).
    static func qcow2Deflate(_ src: UnsafeRawBufferPointer, limit: Int) -> [UInt8]? {
        var strm = z_stream()
        guard deflateInit2_(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                            zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { deflateEnd(&strm) }
        var out = [UInt8](repeating: 0, count: limit)
        let produced: Int? = out.withUnsafeMutableBytes { o in
            strm.next_in = UnsafeMutablePointer(mutating: src.baseAddress?.assumingMemoryBound(to: Bytef.self))
            strm.avail_in = uInt(src.count)
            strm.next_out = o.baseAddress?.assumingMemoryBound(to: Bytef.self)
            strm.avail_out = uInt(o.count)
            let r = deflate(&strm, Z_FINISH)
            return r == Z_STREAM_END ? o.count - Int(strm.avail_out) : nil
        }
        guard let n = produced else { return nil }
        out.removeSubrange(n...)
        return out
    }

    /// qcow2 zstd (compression_type=1): one zstd frame, level 3 as qemu.
    static func zstd(_ src: UnsafeRawBufferPointer, limit: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: max(limit, ZSTD_compressBound(src.count)))
        let n = out.withUnsafeMutableBytes { ZSTD_compress($0.baseAddress, $0.count, src.baseAddress, src.count, 3) }
        guard ZSTD_isError(n) == 0, n < limit else { return nil }
        out.removeSubrange(n...)
        return out
    }

    /// A zlib stream (with header), for VMDK grains. libdeflate at level 6: same format, faster than zlib.
    static func zlibStream(_ src: UnsafeRawBufferPointer) -> [UInt8] {
        guard let c = libdeflate_alloc_compressor(6) else { return [] }
        defer { libdeflate_free_compressor(c) }
        let bound = libdeflate_zlib_compress_bound(c, src.count)
        var out = [UInt8](repeating: 0, count: bound)
        let n = out.withUnsafeMutableBytes { libdeflate_zlib_compress(c, src.baseAddress, src.count, $0.baseAddress, $0.count) }
        out.removeSubrange(n...)
        return out
    }
}

/// A zero-padded copy of `data` of `size` bytes (for the last, partial cluster of a disk).
func padded(_ data: UnsafeRawBufferPointer, to size: Int) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: size)
    b.withUnsafeMutableBytes { $0.copyMemory(from: data) }
    return b
}

extension Array where Element == UInt8 {
    mutating func be16(_ o: Int, _ v: UInt16) { self[o] = UInt8(v >> 8); self[o + 1] = UInt8(v & 0xff) }
    mutating func be32(_ o: Int, _ v: UInt32) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
    mutating func be64(_ o: Int, _ v: UInt64) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
    mutating func le16(_ o: Int, _ v: UInt16) { self[o] = UInt8(v & 0xff); self[o + 1] = UInt8(v >> 8) }
    mutating func le32(_ o: Int, _ v: UInt32) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    mutating func le64(_ o: Int, _ v: UInt64) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
    mutating func put(_ o: Int, _ s: String) { for (i, b) in s.utf8.enumerated() { self[o + i] = b } }
}

/// 16 random bytes (UUIDs, VMDK CIDs).
func randomBytes(_ n: Int) -> [UInt8] {
    var g = SystemRandomNumberGenerator()
    return (0..<n).map { _ in UInt8.random(in: 0...255, using: &g) }
}
