import Convert
import SystemIO
import Foundation
import Glance
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// Writes downloaded bytes into an `OutputFile` (a temporary name in the cache directory). The first block is
/// inspected as it arrives: content that is plainly another format than Glance declares stops the download there.
final class FileDownloadSink: DownloadSink, @unchecked Sendable {
    let file: OutputFile
    let declared: ImageFormat
    let imageID: String
    private var checked = false

    init(file: OutputFile, declared: ImageFormat, imageID: String) {
        self.file = file
        self.declared = declared
        self.imageID = imageID
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if !checked {
            checked = true
            try Self.checkPrefix(Array(bytes), declared: declared, imageID: imageID)
        }
        do {
            try file.pwriteAll(bytes, at: offset)
        } catch let e as FileError {
            throw CacheError.io(e.description)
        }
    }

    /// The header-based formats (qcow2, vmdk, vdi) are recognisable from the first block: a mismatch with the
    /// declared format, or a second signature, is refused before the rest of the image is fetched. The vhd footer
    /// is at the end, so vpc is only checked by the full inspection.
    static func checkPrefix(_ prefix: [UInt8], declared: ImageFormat, imageID: String) throws {
        let found = ((try? ImageInspector.signatures(MemoryStorage(prefix, name: "prefix"))) ?? [])
            .filter { $0 != "vpc" && $0 != "iso9660" }
        if found.count > 1 {
            throw CacheError.unsafe(id: imageID, reasons: ["multiple-formats: the first bytes match \(found.joined(separator: ", "))"])
        }
        let headerFormats: Set<ImageFormat> = [.qcow2, .vmdk, .vdi]
        if let f = found.first, f != declared.rawValue {
            throw CacheError.unsafe(id: imageID, reasons: ["format-mismatch: declared as \(declared.rawValue) but the content starts as \(f)"])
        }
        if found.isEmpty && headerFormats.contains(declared) {
            throw CacheError.unsafe(id: imageID, reasons: ["format-mismatch: declared as \(declared.rawValue) but the content has no \(declared.rawValue) header"])
        }
    }
}

/// Hashes of files on disk (scrub).
enum FileHasher {
    /// Hashes a whole file with the named algorithm.
    /// Polls `token` between MiB: a scrub of a large image stops promptly at shutdown.
    static func hash(_ path: String, algorithm: String, token: CancellationToken) throws -> String {
        guard var d = ImageDigest(algorithm: algorithm) else { throw CacheError.io("cannot hash with \(algorithm)") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CacheError.io("open '\(path)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            try token.check()
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CacheError.io("read '\(path)': \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            buf.withUnsafeBytes { d.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
        return d.hex()
    }
}
