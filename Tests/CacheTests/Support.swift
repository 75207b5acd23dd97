import Crypto
import Foundation
import Glance
import Synchronization
@testable import Cache

let samples: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("samples").path

func temporaryDirectory(_ tag: String) throws -> String {
    let dir = NSTemporaryDirectory() + "imgconv-cache-\(tag)-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

func hex<D: Sequence>(_ d: D) -> String where D.Element == UInt8 { d.map { String(format: "%02x", $0) }.joined() }

func pseudoRandom(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<count).map { _ in
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

/// A Glance stand-in for unit tests of the cache's own logic: it serves images from memory, counts downloads,
/// checks the sha512 as the real verified download does, and can be slowed down or made to fail.
final class FakeSource: ImageSource, @unchecked Sendable {
    struct Entry { var image: GlanceImage; var bytes: [UInt8] }
    private let state = Mutex<[String: Entry]>([:])
    let downloads = Atomic<Int>(0)
    let shows = Atomic<Int>(0)
    /// Sleep this long per 64 KiB block, so concurrent callers overlap with the download.
    let delayPerBlock: UInt64

    init(delayPerBlock: UInt64 = 0) { self.delayPerBlock = delayPerBlock }

    @discardableResult
    func add(_ bytes: [UInt8], diskFormat: String = "raw", id: String = UUID().uuidString.lowercased(),
             corruptAfterHash: Bool = false, withoutHashes: Bool = false) -> String {
        var stored = bytes
        let digest = hex(SHA512.hash(data: bytes))
        if corruptAfterHash && !stored.isEmpty { stored[stored.count / 2] ^= 0xff }
        let image = GlanceImage(id: id, name: "img-\(id.prefix(4))", status: "active", diskFormat: diskFormat,
                                containerFormat: "bare", size: UInt64(bytes.count), checksum: nil,
                                osHashAlgo: withoutHashes ? nil : "sha512", osHashValue: withoutHashes ? nil : digest)
        state.withLock { $0[id] = Entry(image: image, bytes: stored) }
        return id
    }

    func show(_ id: String) async throws -> GlanceImage {
        shows.add(1, ordering: .relaxed)
        guard let e = state.withLock({ $0[id] }) else { throw GlanceError.imageNotFound(id) }
        return e.image
    }

    func download(_ image: GlanceImage, into sink: any DownloadSink, throttled: Bool, progress: DownloadProgress?) async throws -> DownloadResult {
        downloads.add(1, ordering: .relaxed)
        guard let e = state.withLock({ $0[image.id] }) else { throw GlanceError.imageNotFound(image.id) }
        var h = SHA512()
        var offset = 0
        while offset < e.bytes.count {
            let n = min(65536, e.bytes.count - offset)
            try e.bytes[offset..<offset + n].withUnsafeBytes { b in
                h.update(bufferPointer: b)
                try sink.write(b, at: UInt64(offset))
            }
            offset += n
            progress?(UInt64(offset))
            if delayPerBlock > 0 { try await Task.sleep(nanoseconds: delayPerBlock) }
        }
        let got = hex(h.finalize())
        // As VerifiedDownload with verify_hash off: nothing to check, sha512 computed for the record.
        if image.osHashValue != nil && got != image.osHashValue {
            throw GlanceError.integrity(imageID: image.id, algorithm: "sha512", expected: image.osHashValue ?? "", actual: got)
        }
        return DownloadResult(bytes: UInt64(offset), hashes: ["sha512": got], resumes: 0, rangeIgnored: 0)
    }
}

/// The files in a cache directory other than the index.
func cacheFiles(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { !$0.hasPrefix(".imgconv-index") }.sorted()
}
