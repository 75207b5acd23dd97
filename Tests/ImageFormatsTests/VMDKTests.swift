import Foundation
import Testing
@testable import ImageFormats

@Suite("vmdk")
struct VMDKTests {
    func descriptor(_ extentLine: String, createType: String = "monolithicFlat") -> [UInt8] {
        Array("""
        # Disk DescriptorFile
        version=1
        CID=12345678
        parentCID=ffffffff
        createType="\(createType)"

        # Extent description
        \(extentLine)

        # The Disk Data Base
        ddb.adapterType = "ide"

        """.utf8)
    }

    @Test func descriptorExtentsAreReportedButNotOpenedByDefault() throws {
        let image = try openMemory(descriptor("RW 2048 FLAT \"/etc/passwd\" 0"), .vmdk)
        #expect(image.virtualSize == 2048 * 512)
        let d = image.info().json["format-specific"]?["data"]
        #expect(d?["create-type"] == .string("monolithicFlat"))
        #expect(d?["cid"] == .uint(0x1234_5678))
        #expect(d?["extents"] == .array([.object([("virtual-size", .uint(1 << 20)), ("filename", .string("/etc/passwd")),
                                                   ("format", .string("FLAT"))])]))
        var buf = [UInt8](repeating: 0, count: 512)
        #expect(imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }
            == .externalFile(format: .vmdk, kind: "an extent file", name: "/etc/passwd"))
    }

    @Test func evenWhenAllowedOnlyPlainNamesAreOpened() throws {
        var o = OpenOptions()
        o.allowVMDKExtentFiles = true
        var opened: [String] = []
        for bad in ["/etc/passwd", "../secret.img", "sub/dir.img", ".."] {
            let e = imageError {
                _ = try ImageOpener.open(storage: MemoryStorage(descriptor("RW 8 FLAT \"\(bad)\" 0")), declared: .vmdk,
                                         options: o) { name in opened.append(name); return MemoryStorage([]) }
            }
            #expect(e == .externalFile(format: .vmdk, kind: "an extent outside the descriptor's directory", name: bad))
        }
        #expect(opened.isEmpty)
        let image = try ImageOpener.open(storage: MemoryStorage(descriptor("RW 8 FLAT \"disk-flat.img\" 0")), declared: .vmdk,
                                         options: o) { name in
            opened.append(name)
            return MemoryStorage([UInt8](repeating: 0x61, count: 4096))
        }
        #expect(opened == ["disk-flat.img"])
        #expect(try readAll(image) == [UInt8](repeating: 0x61, count: 4096))
    }

    @Test func zeroExtentsAndUnknownTypes() throws {
        let z = try openMemory(descriptor("RW 16 ZERO"), .vmdk)
        #expect(try readAll(z) == [UInt8](repeating: 0, count: 8192))
        #expect(try z.allExtents().map(\.status) == [.zero])
        #expect(imageError { _ = try openMemory(descriptor("RW 16 VMFSRDM \"x\""), .vmdk) }
            == .unsupported(format: .vmdk, feature: "extent type VMFSRDM"))
    }

    @Test func capacityZeroWithEmbeddedDescriptorIsRefused() {
        var b = Samples.bytes("vmdk-monolithic-sparse.vmdk")
        b.putLE64(12, 0)
        #expect(imageError { _ = try openMemory(b) }
            == .unsupported(format: .vmdk, feature: "a sparse header with capacity 0 and an embedded descriptor"))
    }

    @Test func sparseHeaderBounds() {
        let good = Samples.bytes("vmdk-monolithic-sparse.vmdk")
        var b = good
        b.putLE64(20, 0)  // grain size 0
        #expect(imageError { _ = try openMemory(b) } != nil)
        b = good
        b.putLE32(44, 4096)  // numGTEsPerGT too big
        #expect(imageError { _ = try openMemory(b) } != nil)
        b = good
        b.putLE64(56, 1 << 40)  // grain directory past the end
        if case .pastEndOfFile(let what, _, _, _) = imageError({ _ = try openMemory(b) }) {
            #expect(what == "vmdk grain directory")
        } else { Issue.record("expected pastEndOfFile") }
        b = good
        b.putLE64(12, (100 << 40) / 512)  // 100 TiB capacity
        if case .limitExceeded = imageError({ _ = try openMemory(b) }) {} else { Issue.record("expected limitExceeded") }
    }

    @Test func grainPastEndOfFileIsAnError() throws {
        var b = Samples.bytes("vmdk-monolithic-sparse.vmdk")
        let gd = Int(b.le64(56)) * 512
        let gt = Int(b.le32(gd)) * 512
        b.putLE32(gt, 0x7fff_0000)
        let image = try openMemory(b)
        var buf = [UInt8](repeating: 0, count: 512)
        if case .pastEndOfFile = imageError({ try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }) {} else {
            Issue.record("expected pastEndOfFile")
        }
        #expect(try image.check().exitCode == 2)
    }

    @Test func streamOptimizedWithGrainDirectoryAtTheEnd() throws {
        // VMware streams the image and writes GD_AT_END in the header: the real header is the footer before
        // the end-of-stream marker.
        // qemu leaves the header's offset in place and writes no footer, so append VMware's footer marker,
        // footer (the header with the real offset) and end-of-stream marker, and mark the header.
        var b = Samples.bytes("vmdk-stream-optimized.vmdk")
        var marker = [UInt8](repeating: 0, count: 512)
        marker.putLE64(0, 1)
        marker.putLE32(12, 3)
        b += marker + Array(b[0..<512]) + [UInt8](repeating: 0, count: 512)
        b.putLE64(56, UInt64.max)
        let image = try openMemory(b)
        #expect(matchesBase(try readAll(image)))
        var broken = b
        broken[broken.count - 1024] = 0  // the footer's magic
        #expect(imageError { _ = try openMemory(broken) } != nil)
        broken = b
        broken.putLE32(broken.count - 512 + 12, 7)  // the end-of-stream marker's type
        #expect(imageError { _ = try openMemory(broken) } != nil)
    }

    @Test func streamOptimizedGrainBombIsBounded() throws {
        // A grain marker claiming a huge compressed size is refused before anything is read or allocated.
        var b = Samples.bytes("vmdk-stream-optimized.vmdk")
        let image0 = try openMemory(b)
        guard case let .compressed(block) = try image0.segment(at: 0).mapping else { Issue.record("not compressed"); return }
        b.putLE32(Int(block.host) + 8, 0x7fff_ffff)
        let image = try openMemory(b)
        var buf = [UInt8](repeating: 0, count: 512)
        if case .invalidField(_, let field, _, _) = imageError({ try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }) {
            #expect(field.hasPrefix("grain marker size"))
        } else { Issue.record("expected invalidField") }
    }
}
