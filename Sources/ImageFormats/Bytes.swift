/// Endian-aware field access over a byte array, with bounds checked by the caller's slicing.
extension Array where Element == UInt8 {
    @inline(__always) func be16(_ o: Int) -> UInt16 { UInt16(self[o]) << 8 | UInt16(self[o + 1]) }
    @inline(__always) func be32(_ o: Int) -> UInt32 {
        UInt32(self[o]) << 24 | UInt32(self[o + 1]) << 16 | UInt32(self[o + 2]) << 8 | UInt32(self[o + 3])
    }
    @inline(__always) func be64(_ o: Int) -> UInt64 { UInt64(be32(o)) << 32 | UInt64(be32(o + 4)) }
    @inline(__always) func le16(_ o: Int) -> UInt16 { UInt16(self[o]) | UInt16(self[o + 1]) << 8 }
    @inline(__always) func le32(_ o: Int) -> UInt32 {
        UInt32(self[o]) | UInt32(self[o + 1]) << 8 | UInt32(self[o + 2]) << 16 | UInt32(self[o + 3]) << 24
    }
    @inline(__always) func le64(_ o: Int) -> UInt64 { UInt64(le32(o)) | UInt64(le32(o + 4)) << 32 }

    /// Bytes `o ..< o+n` as text, stopping at the first NUL.
    func cString(_ o: Int, _ n: Int) -> String {
        let slice = self[o..<(o + n)]
        let end = slice.firstIndex(of: 0) ?? slice.endIndex
        return String(decoding: slice[o..<end], as: UTF8.self)
    }

    func hasPrefix(_ p: [UInt8], at o: Int = 0) -> Bool {
        guard o >= 0, count >= o + p.count else { return false }
        for i in 0..<p.count where self[o + i] != p[i] { return false }
        return true
    }
}

/// Whether `offset ..< offset+length` lies inside `size` bytes, without overflowing on forged values.
@inline(__always) func fits(_ offset: UInt64, _ length: UInt64, in size: UInt64) -> Bool {
    offset <= size && length <= size - offset
}

@inline(__always) public func divRoundUp(_ a: UInt64, _ b: UInt64) -> UInt64 { a / b + (a % b == 0 ? 0 : 1) }
@inline(__always) func isPowerOfTwo(_ v: UInt64) -> Bool { v != 0 && v & (v - 1) == 0 }

extension Sequence where Element == UInt8 {
    var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        for b in self { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }
}
