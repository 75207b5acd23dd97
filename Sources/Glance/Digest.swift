import Crypto

/// One incremental hash named as Glance names it (`os_hash_algo`, or md5 for the legacy `checksum`).
public struct ImageDigest: Sendable {
    public let algorithm: String
    private var state: State

    private enum State: Sendable {
        case md5(Insecure.MD5), sha1(Insecure.SHA1), sha256(SHA256), sha384(SHA384), sha512(SHA512)
    }

    public static let supported = ["md5", "sha1", "sha256", "sha384", "sha512"]

    /// Nil for an algorithm we cannot compute.
    public init?(algorithm: String) {
        self.algorithm = algorithm.lowercased()
        switch self.algorithm {
        case "md5": state = .md5(Insecure.MD5())
        case "sha1": state = .sha1(Insecure.SHA1())
        case "sha256": state = .sha256(SHA256())
        case "sha384": state = .sha384(SHA384())
        case "sha512": state = .sha512(SHA512())
        default: return nil
        }
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        switch state {
        case var .md5(h): h.update(bufferPointer: bytes); state = .md5(h)
        case var .sha1(h): h.update(bufferPointer: bytes); state = .sha1(h)
        case var .sha256(h): h.update(bufferPointer: bytes); state = .sha256(h)
        case var .sha384(h): h.update(bufferPointer: bytes); state = .sha384(h)
        case var .sha512(h): h.update(bufferPointer: bytes); state = .sha512(h)
        }
    }

    /// Lower-case hex, as Glance stores it.
    public func hex() -> String {
        switch state {
        case let .md5(h): return Self.hex(h.finalize())
        case let .sha1(h): return Self.hex(h.finalize())
        case let .sha256(h): return Self.hex(h.finalize())
        case let .sha384(h): return Self.hex(h.finalize())
        case let .sha512(h): return Self.hex(h.finalize())
        }
    }

    static func hex<D: Sequence>(_ d: D) -> String where D.Element == UInt8 {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in d {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
