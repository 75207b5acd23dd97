import Testing
@testable import ImageFormats

@Suite("vdi")
struct VDITests {
    let good = Samples.bytes("vdi-dynamic.vdi")

    @Test func versionAndBounds() {
        var b = good
        b.putLE32(0x44, 0x0000_0001)
        #expect(imageError { _ = try openMemory(b, .vdi) } == .unsupported(format: .vdi, feature: "version 0.1 (only 1.1 is read)"))
        b = good
        b.putLE32(384, 0x7fff_ffff)
        #expect(imageError { _ = try openMemory(b, .vdi) }
            == .limitExceeded(format: .vdi, field: "blocks in image", value: 0x7fff_ffff, limit: 0x3fff_ffff))
        b = good
        b.putLE32(384, b.le32(384) + 1)  // one block more than the disk needs
        if case .invalidField(_, let field, _, _) = imageError({ _ = try openMemory(b, .vdi) }) {
            #expect(field == "blocks in image")
        } else { Issue.record("expected invalidField") }
        b = good
        b.putLE32(384, 0x0100_0000)  // 16 Mi blocks for a 16 TiB disk: a 64 MiB block map the file does not hold
        b.putLE64(368, 16 << 40)
        if case .pastEndOfFile(let what, _, _, _) = imageError({ _ = try openMemory(b, .vdi) }) {
            #expect(what == "vdi block map")
        } else { Issue.record("expected pastEndOfFile") }
        b = good
        b.putLE32(376, 4096)
        #expect(imageError { _ = try openMemory(b, .vdi) } == .unsupported(format: .vdi, feature: "block size 4096 (only 1 MiB)"))
    }

    @Test func zeroAndUnallocatedBlocks() throws {
        var b = good
        let map = Int(b.le32(340))
        b.putLE32(map, VDIImage.discarded)
        let image = try openMemory(b, .vdi)
        #expect(try image.extent(at: 0).status == .zero)
        var buf = [UInt8](repeating: 0xff, count: 4096)
        try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        #expect(buf.allSatisfy { $0 == 0 })
    }

    @Test func parentIsDetectedAndBlocksAreNotBorrowed() throws {
        var b = good
        b[440] = 0x42  // parent UUID
        let map = Int(b.le32(340))
        b.putLE32(map, VDIImage.unallocated)
        let image = try openMemory(b, .vdi) as! VDIImage
        #expect(image.hasParent)
        #expect(try image.extent(at: 0).status == .unallocated)
    }

    @Test func sharedDataBlockIsCorruption() throws {
        var b = good
        let map = Int(b.le32(340))
        b.putLE32(map + 4, b.le32(map))
        #expect(try openMemory(b, .vdi).check().exitCode == 2)
    }

    @Test func blockPastEndOfFile() throws {
        var b = good
        let map = Int(b.le32(340))
        b.putLE32(map, 1000)
        let image = try openMemory(b, .vdi)
        var buf = [UInt8](repeating: 0, count: 512)
        if case .pastEndOfFile = imageError({ try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }) {} else {
            Issue.record("expected pastEndOfFile")
        }
    }
}
