import Testing
@testable import ImageFormats

@Suite("vpc")
struct VPCTests {
    func fixFooterChecksum(_ b: inout [UInt8], at o: Int) {
        let f = Array(b[o..<(o + 512)])
        b.putBE32(o + 64, VPCImage.checksum(f, skipping: 64..<68))
    }

    @Test func footerChecksumIsVerified() {
        var b = Samples.bytes("vpc-dynamic.vhd")
        b[40] ^= 1  // original size in the footer copy, checksum not updated
        let e = imageError { _ = try openMemory(b, .vpc) }
        if case .invalidField(_, let field, _, _) = e { #expect(field == "footer checksum") } else { Issue.record("got \(String(describing: e))") }
    }

    @Test func virtualSizeFollowsCreatorApplication() throws {
        var b = Samples.bytes("vpc-dynamic.vhd")
        // qemu wrote CHS geometry; current_size is 2 MiB + 512 rounded by CHS.
        let chs = try openMemory(b).virtualSize
        let cyl = UInt64(b.be16(56)), heads = UInt64(b[58]), spt = UInt64(b[59])
        #expect(chs == cyl * heads * spt * 512)
        // Hyper-V ("win "): the footer's current_size counts.
        b.replaceSubrange(28..<32, with: Array("win ".utf8))
        b.putBE64(48, 3 << 20)
        fixFooterChecksum(&b, at: 0)
        #expect(try openMemory(b).virtualSize == 3 << 20)
        // Virtual PC ("vpc "): CHS again.
        b.replaceSubrange(28..<32, with: Array("vpc ".utf8))
        fixFooterChecksum(&b, at: 0)
        #expect(try openMemory(b).virtualSize == chs)
        // The maximum geometry means "use current_size" whatever the creator.
        b.putBE32(56, UInt32(65535) << 16 | 16 << 8 | 255)
        fixFooterChecksum(&b, at: 0)
        #expect(try openMemory(b).virtualSize == 3 << 20)
    }

    @Test func batPastEndOfFileIsAnError() throws {
        var b = Samples.bytes("vpc-dynamic.vhd")
        let dyn = Int(b.be64(16))
        let bat = Int(b.be64(dyn + 16))
        b.putBE32(bat, 0x00ff_ffff)
        let image = try openMemory(b, .vpc)
        var buf = [UInt8](repeating: 0, count: 512)
        if case .pastEndOfFile = imageError({ try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }) {} else {
            Issue.record("expected pastEndOfFile")
        }
        #expect(try image.check().exitCode == 2)
    }

    @Test func differencingDiskReportsParentAndNeverFollowsIt() throws {
        var b = Samples.bytes("vpc-dynamic.vhd")
        b.putBE32(60, VPCImage.differencing)
        fixFooterChecksum(&b, at: 0)
        let dyn = Int(b.be64(16))
        let name = Array("C:\\parent.vhd".utf16)
        for (i, u) in name.enumerated() { b[dyn + 64 + 2 * i] = UInt8(u >> 8); b[dyn + 65 + 2 * i] = UInt8(u & 0xff) }
        // Clear the bitmap of the first block: its sectors then belong to the parent.
        let bat = Int(b.be64(dyn + 16))
        let block0 = Int(b.be32(bat)) * 512
        for i in 0..<512 { b[block0 + i] = 0 }
        let image = try openMemory(b, .vpc) as! VPCImage
        #expect(image.parentName == "C:\\parent.vhd")
        #expect(image.info().backingFilename == "C:\\parent.vhd")
        let first = try image.extent(at: 0)
        #expect(first.status == .unallocated)
        var buf = [UInt8](repeating: 0xff, count: 4096)
        try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        #expect(buf.allSatisfy { $0 == 0 })
    }

    @Test func dynamicHeaderBounds() {
        var b = Samples.bytes("vpc-dynamic.vhd")
        let dyn = Int(b.be64(16))
        b.putBE32(dyn + 32, 3000)  // block size not a power of two
        #expect(imageError { _ = try openMemory(b, .vpc) } != nil)
        b = Samples.bytes("vpc-dynamic.vhd")
        b.putBE32(dyn + 28, 0)  // BAT too small for the disk
        #expect(imageError { _ = try openMemory(b, .vpc) } != nil)
    }
}
