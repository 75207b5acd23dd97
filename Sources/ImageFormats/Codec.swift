#if canImport(Glibc)
import Glibc
#endif
import CDeflate
import CZlib
import CZstd

/// Whole-block decompression for compressed clusters and grains. Output never exceeds the destination
/// (one cluster or grain): a stream that would produce more stops there, so a zip bomb costs one block.
enum Codec {
    enum Kind { case rawDeflate, zlib, zstd }

    /// Decompresses `src` into `dst`. With `mustFill`, the output must cover all of `dst` (qcow2 semantics);
    /// returns the number of bytes produced.
    @discardableResult
    static func decompress(_ kind: Kind, _ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer,
                           mustFill: Bool) throws(CodecError) -> Int {
        switch kind {
        case .rawDeflate, .zlib:
            // libdeflate inflates whole buffers 2-3x faster than zlib (BENCHMARKS.md). It needs the stream to
            // end exactly at a full block; anything else (a stream longer than one cluster, which qemu accepts
            // and truncates) falls back to zlib's streaming semantics.
            if mustFill && useLibdeflate, let n = libdeflateInflate(kind, src, dst), n == dst.count { return n }
            return try inflate(src, dst, windowBits: kind == .zlib ? 15 : -15, mustFill: mustFill)
        case .zstd: return try unzstd(src, dst, mustFill: mustFill)
        }
    }

    struct CodecError: Error { var reason: String }

    /// IMGCONV_INFLATE=zlib turns libdeflate off, to measure what it buys (bench/convert.sh does).
    static let useLibdeflate: Bool = getenv("IMGCONV_INFLATE").map { String(cString: $0) } != "zlib"

    /// Whole-buffer inflate with libdeflate; nil when it cannot produce exactly `dst.count` bytes.
    private static func libdeflateInflate(_ kind: Kind, _ src: UnsafeRawBufferPointer,
                                          _ dst: UnsafeMutableRawBufferPointer) -> Int? {
        guard let d = libdeflate_alloc_decompressor() else { return nil }
        defer { libdeflate_free_decompressor(d) }
        let r = kind == .zlib
            ? libdeflate_zlib_decompress(d, src.baseAddress, src.count, dst.baseAddress, dst.count, nil)
            : libdeflate_deflate_decompress(d, src.baseAddress, src.count, dst.baseAddress, dst.count, nil)
        return r == LIBDEFLATE_SUCCESS ? dst.count : nil
    }

    private static func inflate(_ src: UnsafeRawBufferPointer, _ dst: UnsafeMutableRawBufferPointer,
                                windowBits: Int32, mustFill: Bool) throws(CodecError) -> Int {
        var strm = z_stream()
        guard inflateInit2_(&strm, windowBits, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw CodecError(reason: "zlib initialisation failed")
        }
        defer { inflateEnd(&strm) }
        strm.next_in = UnsafeMutablePointer(mutating: src.baseAddress?.assumingMemoryBound(to: Bytef.self))
        strm.avail_in = uInt(src.count)
        strm.next_out = dst.baseAddress?.assumingMemoryBound(to: Bytef.self)
        strm.avail_out = uInt(dst.count)
        let ret = CZlib.inflate(&strm, Z_FINISH)
        let produced = dst.count - Int(strm.avail_out)
        switch ret {
        case Z_STREAM_END:
            break
        case Z_BUF_ERROR where strm.avail_out == 0:
            break  // output full: the rest of the input is padding or garbage past one block
        case Z_BUF_ERROR:
            throw CodecError(reason: "stream ends early after \(produced) bytes")
        default:
            throw CodecError(reason: "zlib error \(ret)" + (strm.msg.map { " (\(String(cString: $0)))" } ?? ""))
        }
        if mustFill && produced != dst.count {
            throw CodecError(reason: "decompressed to \(produced) bytes, expected \(dst.count)")
        }
        return produced
    }

    private static func unzstd(_ src: UnsafeRawBufferPointer, _ dst: UnsafeMutableRawBufferPointer,
                               mustFill: Bool) throws(CodecError) -> Int {
        guard let ctx = ZSTD_createDCtx() else { throw CodecError(reason: "zstd initialisation failed") }
        defer { ZSTD_freeDCtx(ctx) }
        var input = ZSTD_inBuffer(src: src.baseAddress, size: src.count, pos: 0)
        var output = ZSTD_outBuffer(dst: dst.baseAddress, size: dst.count, pos: 0)
        while output.pos < output.size {
            let before = (input.pos, output.pos)
            let ret = ZSTD_decompressStream(ctx, &output, &input)
            if ZSTD_isError(ret) != 0 {
                throw CodecError(reason: "zstd: " + String(cString: ZSTD_getErrorName(ret)))
            }
            if ret == 0 { break }  // frame complete
            if before == (input.pos, output.pos) { break }  // no progress: input exhausted
        }
        if mustFill && output.pos != dst.count {
            throw CodecError(reason: "decompressed to \(output.pos) bytes, expected \(dst.count)")
        }
        return output.pos
    }
}
