import Foundation
@testable import ImageFormats

/// The committed samples (samples/make-samples.sh) and the raw disk they all encode.
enum Samples {
    static let dir: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("samples").path

    static func path(_ name: String) -> String { dir + "/" + name }

    static let base: [UInt8] = Array(FileManager.default.contents(atPath: path("base.raw"))!)

    /// (file, format) for every sample image.
    static let all: [(String, ImageFormat)] = [
        ("base.raw", .raw),
        ("qcow2-v2.qcow2", .qcow2), ("qcow2-v3.qcow2", .qcow2), ("qcow2-512.qcow2", .qcow2),
        ("qcow2-zlib.qcow2", .qcow2), ("qcow2-zstd.qcow2", .qcow2), ("qcow2-extl2.qcow2", .qcow2),
        ("qcow2-zero-clusters.qcow2", .qcow2),
        ("vmdk-monolithic-sparse.vmdk", .vmdk), ("vmdk-stream-optimized.vmdk", .vmdk),
        ("vmdk-monolithic-flat.vmdk", .vmdk),
        ("vpc-dynamic.vhd", .vpc), ("vpc-fixed.vhd", .vpc),
        ("vdi-dynamic.vdi", .vdi), ("vdi-static.vdi", .vdi),
    ]

    static func bytes(_ name: String) -> [UInt8] { Array(FileManager.default.contents(atPath: path(name))!) }
}

extension Array where Element == UInt8 {
    mutating func putBE32(_ o: Int, _ v: UInt32) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
    mutating func putBE64(_ o: Int, _ v: UInt64) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
    mutating func putLE32(_ o: Int, _ v: UInt32) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    mutating func putLE64(_ o: Int, _ v: UInt64) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
}

/// Reads a whole image through the library.
func readAll(_ image: any DiskImage, chunk: Int = 65536) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Int(image.virtualSize))
    var pos = 0
    while pos < out.count {
        let n = min(chunk, out.count - pos)
        try out.withUnsafeMutableBytes { b in
            try image.read(into: UnsafeMutableRawBufferPointer(rebasing: b[pos..<pos + n]), at: UInt64(pos))
        }
        pos += n
    }
    return out
}

/// Whether `data` equals the base disk (and is zero beyond it, for formats that round the size up).
func matchesBase(_ data: [UInt8]) -> Bool {
    let base = Samples.base
    guard data.count >= base.count else { return false }
    return Array(data[0..<base.count]) == base && data[base.count...].allSatisfy { $0 == 0 }
}

/// Opens an in-memory image.
func openMemory(_ bytes: [UInt8], _ format: ImageFormat? = nil, options: OpenOptions = OpenOptions()) throws -> any DiskImage {
    try ImageOpener.open(storage: MemoryStorage(bytes), declared: format, options: options)
}

/// The error an expression throws, as an ImageError.
func imageError(_ body: () throws -> Void) -> ImageError? {
    do { try body(); return nil } catch let e as ImageError { return e } catch { return nil }
}
