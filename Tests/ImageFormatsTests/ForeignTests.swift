import Foundation
import Testing
@testable import ImageFormats

/// Headers of the formats imgconv recognises but does not read, written as their specifications (and qemu's
/// drivers) lay them out, each with a known virtual size.
enum ForeignHeaders {
    static func qcow1(size: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        b.replaceSubrange(0..<4, with: [0x51, 0x46, 0x49, 0xfb])
        b.putBE32(4, 1)
        b.putBE64(24, size)
        b[32] = 12  // cluster_bits
        b[33] = 9   // l2_bits
        return b
    }

    static func qed(size: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        b.replaceSubrange(0..<4, with: Array("QED".utf8) + [0])
        b.putLE32(4, 65536)
        b.putLE32(8, 4)
        b.putLE64(48, size)
        return b
    }

    static func vhdx(size: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 320 << 10)
        b.replaceSubrange(0..<8, with: Array("vhdxfile".utf8))
        let rt = 192 << 10
        b.replaceSubrange(rt..<(rt + 4), with: Array("regi".utf8))
        b.putLE32(rt + 8, 1)
        b.replaceSubrange((rt + 16)..<(rt + 32), with: ForeignImage.vhdxMetadataRegion)
        let meta = 256 << 10
        b.putLE64(rt + 32, UInt64(meta))
        b.putLE32(rt + 40, 64 << 10)
        b.replaceSubrange(meta..<(meta + 8), with: Array("metadata".utf8))
        b[meta + 10] = 2
        b.replaceSubrange((meta + 32)..<(meta + 48), with: ForeignImage.vhdxVirtualDiskSize)
        b.putLE32(meta + 48, 4096)
        b.replaceSubrange((meta + 64)..<(meta + 80), with: ForeignImage.vhdxFileParameters)
        b.putLE32(meta + 80, 4104)
        b.putLE64(meta + 4096, size)
        b.putLE32(meta + 4104, 32 << 20)
        return b
    }

    static func luks(payloadSectors: UInt32, fileSize: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: fileSize)
        b.replaceSubrange(0..<6, with: [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe])
        b[7] = 1  // version 1 (big-endian u16)
        b.putBE32(104, payloadSectors)
        return b
    }

    static func parallels(size: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        b.replaceSubrange(0..<16, with: Array("WithouFreSpacExt".utf8))
        b.putLE32(16, 2)
        b.putLE32(28, 2048)  // sectors per cluster
        b.putLE64(36, size / 512)
        return b
    }

    static func bochs(size: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        b.replaceSubrange(0..<23, with: Array("Bochs Virtual HD Image".utf8) + [0])
        b.replaceSubrange(32..<40, with: Array("Redolog".utf8) + [0])
        b.replaceSubrange(48..<56, with: Array("Growing".utf8) + [0])
        b.putLE32(64, 0x0002_0000)
        b.putLE32(68, 512)
        b.putLE32(72, UInt32((size + (512 << 10) - 1) / (512 << 10)))  // catalog entries
        b.putLE32(76, 512)
        b.putLE32(80, 512 << 10)
        b.putLE64(88, size)
        return b
    }

    static func cloop(blockSize: UInt32, blocks: UInt32) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        b.replaceSubrange(0..<ForeignImage.cloopMagic.count, with: ForeignImage.cloopMagic)
        b.putBE32(128, blockSize)
        b.putBE32(132, blocks)
        for i in 0...Int(blocks) { b.putBE64(136 + i * 8, UInt64(136 + (Int(blocks) + 1) * 8)) }
        return b
    }

    static func dmg(size: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 8192)
        let k = b.count - 512
        b.replaceSubrange(k..<(k + 4), with: Array("koly".utf8))
        b.putBE32(k + 4, 4)
        b.putBE32(k + 8, 512)
        b.putBE64(k + 0x1ec, size / 512)
        return b
    }

    static let all: [(ForeignFormat, [UInt8], UInt64?)] = [
        (.qcow, qcow1(size: 3 << 20), 3 << 20),
        (.qed, qed(size: 5 << 20), 5 << 20),
        (.vhdx, vhdx(size: 7 << 30), 7 << 30),
        (.luks, luks(payloadSectors: 4, fileSize: 6144), 4096),
        (.parallels, parallels(size: 9 << 20), 9 << 20),
        (.bochs, bochs(size: 11 << 20), 11 << 20),
        (.cloop, cloop(blockSize: 65536, blocks: 4), 4 * 65536),
        (.dmg, dmg(size: 13 << 20), 13 << 20),
    ]
}

/// QED, VHDX, LUKS, Parallels, Bochs, cloop, DMG and qcow version 1: recognised, named as qemu-img names them,
/// refused, and never read as raw.
@Suite("foreign formats")
struct ForeignFormatTests {
    @Test(arguments: ForeignHeaders.all.map { ($0.0.rawValue, $0.1, $0.2) })
    func recognisedNamedAndRefused(name: String, bytes: [UInt8], size: UInt64?) throws {
        let storage = MemoryStorage(bytes, name: "x.\(name)")
        let found = try ForeignImage.probe(storage)
        #expect(found.map(\.format.rawValue) == [name])
        #expect(found.first?.virtualSize == size)
        #expect(try ImageInspector.signatures(storage) == [name])
        // Nothing declared: refused as unsupported, never read as raw.
        let (v, image) = ImageInspector.inspect(storage: storage, declared: nil)
        #expect(image == nil && !v.safe && v.detected == nil && v.formatName == name)
        #expect(v.reasons.map(\.code) == ["unsupported-format"], "\(v.reasons)")
        // Declared raw (or anything else): a format mismatch.
        for declared in ImageFormat.allCases {
            let (d, img) = ImageInspector.inspect(storage: storage, declared: declared)
            #expect(img == nil && d.reasons.map(\.code) == ["format-mismatch"], "\(declared): \(d.reasons)")
            #expect(imageError { _ = try ImageOpener.open(storage: storage, declared: declared) }
                    == .unsupportedFormat(ForeignFormat(rawValue: name)!, declared: declared))
        }
        #expect(imageError { _ = try ImageOpener.open(storage: storage) } == .unsupportedFormat(ForeignFormat(rawValue: name)!, declared: nil))
        // info names it as qemu-img does.
        let info = found[0].info(filename: "x", actualSize: nil)
        #expect(info.formatName == name)
        #expect(info.human.contains("file format: \(name)\n"))
    }

    @Test func qcowVersion1IsNotAQcow2Candidate() throws {
        let storage = MemoryStorage(ForeignHeaders.qcow1(size: 1 << 20))
        #expect(try FormatDetector.candidates(storage) == [.raw])
        #expect(try ForeignImage.probe(storage).map(\.format) == [.qcow])
        // A qcow2 header stays a qcow2 candidate.
        #expect(try FormatDetector.candidates(MemoryStorage(Samples.bytes("qcow2-v3.qcow2"))) == [.qcow2])
    }

    @Test func nearMissesAreRaw() throws {
        // A Bochs header of another subtype, a parallels header of another version, and a bare "koly" without its
        // version are not those formats (as qemu's probes decide), so they are raw.
        var b = ForeignHeaders.bochs(size: 1 << 20)
        b.replaceSubrange(48..<56, with: Array("Volatil".utf8) + [0])
        var p = ForeignHeaders.parallels(size: 1 << 20)
        p.putLE32(16, 3)
        var d = ForeignHeaders.dmg(size: 1 << 20)
        d.putBE32(d.count - 508, 3)
        for bytes in [b, p, d] {
            let (v, image) = ImageInspector.inspect(storage: MemoryStorage(bytes), declared: .raw)
            #expect(v.safe && v.detected == .raw && image != nil, "\(v.reasons)")
        }
    }

    @Test func foreignPolyglotIsListed() throws {
        // A qcow2 whose last 512 bytes are a DMG trailer.
        var q = Samples.bytes("qcow2-v3.qcow2")
        q += ForeignHeaders.dmg(size: 1 << 20).suffix(512)
        let (v, _) = ImageInspector.inspect(storage: MemoryStorage(q), declared: .qcow2)
        #expect(v.signatures == ["qcow2", "dmg"])
        #expect(v.reasons.map(\.code).contains("multiple-formats"))
        #expect(!v.safe)
    }
}
