import CLibCrypto

/// A streaming hash of an image, by Glance's algorithm name (`os_hash_algo`, or md5 for `checksum`). It runs on
/// every byte of every download, so it uses the system libcrypto's EVP digests: on AMD CPUs its SHA-512 is 1.7×
/// faster than the one in swift-crypto's BoringSSL (see `Sources/CLibCrypto/shim.h`).
public struct ImageDigest: Sendable {
    public let algorithm: String
    private let context: Context

    /// One EVP context; only its owning digest touches it, from one thread at a time.
    private final class Context: @unchecked Sendable {
        let ctx: OpaquePointer
        init?(_ md: OpaquePointer) {
            guard let c = EVP_MD_CTX_new() else { return nil }
            guard EVP_DigestInit_ex(c, md, nil) == 1 else {
                EVP_MD_CTX_free(c)
                return nil
            }
            ctx = c
        }
        deinit { EVP_MD_CTX_free(ctx) }
    }

    public static let supported = ["md5", "sha1", "sha256", "sha384", "sha512"]

    /// Nil for an algorithm we cannot compute (or one the system's crypto policy refuses, such as md5 under FIPS).
    public init?(algorithm: String) {
        self.algorithm = algorithm.lowercased()
        let md: OpaquePointer?
        switch self.algorithm {
        case "md5": md = EVP_md5()
        case "sha1": md = EVP_sha1()
        case "sha256": md = EVP_sha256()
        case "sha384": md = EVP_sha384()
        case "sha512": md = EVP_sha512()
        default: return nil
        }
        guard let md, let c = Context(md) else { return nil }
        context = c
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        // Cannot fail for an initialised software digest.
        _ = EVP_DigestUpdate(context.ctx, base, bytes.count)
    }

    /// Lower-case hex, as Glance stores it. The digest can go on taking bytes afterwards: this finalises a copy.
    public func hex() -> String {
        guard let copy = EVP_MD_CTX_new() else { return "" }
        defer { EVP_MD_CTX_free(copy) }
        var out = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        guard EVP_MD_CTX_copy_ex(copy, context.ctx) == 1, EVP_DigestFinal_ex(copy, &out, &length) == 1 else { return "" }
        return Self.hex(out.prefix(Int(length)))
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
