import Foundation
import Testing
@testable import ImageFormats

@Suite("samples: every format reads back the base disk")
struct SampleTests {
    @Test(arguments: Samples.all.map(\.0))
    func readsBaseDisk(_ name: String) throws {
        let format = Samples.all.first { $0.0 == name }!.1
        #expect(try FormatDetector.detect(FileStorage(path: Samples.path(name))) == format)
        var options = OpenOptions()
        options.allowVMDKExtentFiles = true
        let image = try ImageOpener.open(path: Samples.path(name), declared: format, options: options)
        #expect(image.format == format)
        #expect(matchesBase(try readAll(image)), "\(name) does not read back as base.raw")
        // Unaligned, odd-sized reads cross clusters and grains.
        var small = [UInt8](repeating: 0xee, count: 777)
        try small.withUnsafeMutableBytes { try image.read(into: $0, at: 65536 - 100) }
        #expect(small == Array(Samples.base[(65536 - 100)..<(65536 - 100 + 777)]))
        #expect(try image.check().exitCode == 0)
    }

    @Test(arguments: Samples.all.map(\.0))
    func mapCoversDiskAndDataHoldsAllNonZeroBytes(_ name: String) throws {
        var options = OpenOptions()
        options.allowVMDKExtentFiles = true
        let image = try ImageOpener.open(path: Samples.path(name), options: options)
        let extents = try image.allExtents()
        var pos: UInt64 = 0
        for e in extents {
            #expect(e.start == pos)
            #expect(e.length > 0)
            pos = e.end
            if e.status != .data {
                // Everything outside data extents reads as zero.
                let end = min(Int(e.end), Samples.base.count)
                if Int(e.start) < end { #expect(Samples.base[Int(e.start)..<end].allSatisfy { $0 == 0 }) }
            }
        }
        #expect(pos == image.virtualSize)
        // Sparse formats do not call their holes data.
        if image.format == .qcow2 || image.format == .vmdk && !name.contains("flat") {
            let data = extents.filter { $0.status == .data }.reduce(UInt64(0)) { $0 + $1.length }
            #expect(data < image.virtualSize)
        }
    }

    @Test func concurrentReadsAgree() async throws {
        let image = try ImageOpener.open(path: Samples.path("qcow2-zlib.qcow2"))
        let expected = Samples.base
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for t in 0..<8 {
                group.addTask {
                    var ok = true
                    for i in stride(from: t * 4096, to: expected.count - 70000, by: 8 * 4096 + 513) {
                        var buf = [UInt8](repeating: 0, count: 70000)
                        try buf.withUnsafeMutableBytes { try image.read(into: $0, at: UInt64(i)) }
                        ok = ok && buf == Array(expected[i..<(i + 70000)])
                    }
                    return ok
                }
            }
            for try await ok in group { #expect(ok) }
        }
    }

    @Test func readPastVirtualSizeIsAnError() throws {
        let image = try ImageOpener.open(path: Samples.path("qcow2-v3.qcow2"))
        var buf = [UInt8](repeating: 0, count: 1024)
        let e = imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: image.virtualSize - 512) } }
        #expect(e == .outOfRange(offset: image.virtualSize - 512, length: 1024, virtualSize: image.virtualSize))
    }
}

@Suite("detection")
struct DetectionTests {
    @Test func declaredFormatMustMatchContent() throws {
        let e = imageError { _ = try ImageOpener.open(path: Samples.path("qcow2-v3.qcow2"), declared: .raw) }
        #expect(e == .formatMismatch(declared: .raw, detected: .qcow2))
        let e2 = imageError { _ = try ImageOpener.open(path: Samples.path("base.raw"), declared: .qcow2) }
        #expect(e2 == .formatMismatch(declared: .qcow2, detected: .raw))
        let e3 = imageError { _ = try ImageOpener.open(path: Samples.path("vpc-fixed.vhd"), declared: .raw) }
        #expect(e3 == .formatMismatch(declared: .raw, detected: .vpc))
    }

    @Test func formatNames() throws {
        #expect(try ImageFormat(name: "vhd") == .vpc)
        #expect(try ImageFormat(name: "VPC") == .vpc)
        #expect(try ImageFormat(name: "qcow2") == .qcow2)
        #expect(imageError { _ = try ImageFormat(name: "qed") } == .unknownFormatName("qed"))
    }

    @Test func fixedVHDNeedsAValidFooterChecksum() throws {
        var b = Samples.bytes("vpc-fixed.vhd")
        b[b.count - 512 + 64] ^= 0xff
        // A footer whose checksum fails is not a VHD: the content is raw.
        #expect(try FormatDetector.detect(MemoryStorage(b)) == .raw)
    }

    @Test func vmdkDescriptorText() {
        #expect(FormatDetector.isVMDKDescriptor(Array("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n".utf8)))
        #expect(!FormatDetector.isVMDKDescriptor(Array("hello\nversion=1\ncreateType=x\n".utf8)))
        #expect(!FormatDetector.isVMDKDescriptor(Array("version=1\n".utf8) + [0, 1, 0]))
    }

    @Test func polyglotListsEveryCandidate() throws {
        // A qcow2 with a valid VHD footer appended matches two formats.
        var b = Samples.bytes("qcow2-v3.qcow2")
        b += Array(Samples.bytes("vpc-fixed.vhd").suffix(512))
        #expect(try FormatDetector.candidates(MemoryStorage(b)) == [.qcow2, .vpc])
    }
}

@Suite("raw")
struct RawTests {
    @Test func holesFoundWithSeekData() throws {
        let path = NSTemporaryDirectory() + "imgconv-raw-\(UUID().uuidString).raw"
        defer { try? FileManager.default.removeItem(atPath: path) }
        FileManager.default.createFile(atPath: path, contents: nil)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try h.truncate(atOffset: 8 << 20)
        try h.seek(toOffset: 2 << 20)
        h.write(Data(repeating: 7, count: 65536))
        try h.close()
        let image = try ImageOpener.open(path: path, declared: .raw)
        let ext = try image.allExtents()
        #expect(ext.map(\.status) == [.zero, .data, .zero])
        #expect(ext[1].start == 2 << 20 && ext[1].length == 65536 && ext[1].hostOffset == 2 << 20)
        #expect(image.info().actualSize == 65536)
    }
}
