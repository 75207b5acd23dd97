import Foundation
import ImageFormats
import Testing

/// The hostile-image peer suite: the cases of oslo.utils' format-inspector tests
/// (oslo_utils/tests/imageutils/test_format_inspector.py), with images built here, plus the cases it misses.
@Suite("hostile images", .enabled(if: qemuAvailable, "qemu-img not installed"))
struct SafetyTests {
    let dir: String
    init() throws { dir = try temporaryDirectory("safety") }

    func create(_ fmt: String, _ size: String, _ opts: [String] = [], name: String? = nil) throws -> String {
        let path = dir + "/" + (name ?? "img-\(UUID().uuidString.prefix(6)).\(fmt)")
        try run(["qemu-img", "create", "-q", "-f", fmt] + opts + [path, size])
        return path
    }

    func verdict(_ path: String, _ declared: ImageFormat? = nil) -> SafetyVerdict {
        ImageInspector.inspect(path: path, declared: declared).verdict
    }

    func codes(_ v: SafetyVerdict) -> [String] { v.reasons.map(\.code) }

    func qemuSize(_ path: String, _ fmt: String) throws -> UInt64 {
        let j = try parseJSON(run(["qemu-img", "info", "-f", fmt, "--output=json", path]).out) as! [String: Any]
        return UInt64(j["virtual-size"] as! Int)
    }

    func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try h.seek(toOffset: offset)
        h.write(Data(bytes))
        try h.close()
    }

    func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    // MARK: oslo test_format / test_subformat / test_vdi: detection, virtual size, safe, at odd sizes.

    @Test(arguments: [("qcow2", [String]()), ("vpc", []), ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]), ("vdi", [])])
    func formatsAtOddSizesAreDetectedSizedAndSafe(_ fmt: String, _ opts: [String]) throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for size in ["512M", "513M", "2057M", "7M"] {
            let img = try create(fmt, size, opts)
            let v = verdict(img, try ImageFormat(name: fmt))
            #expect(v.safe, "\(fmt) \(size): \(v.reasons)")
            #expect(v.detected?.rawValue == fmt)
            #expect(v.virtualSize == (try qemuSize(img, fmt)), "\(fmt) \(size)")
        }
    }

    @Test func formatsImgconvDoesNotReadAreRefused() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let qed = try create("qed", "10M")
        #expect(codes(verdict(qed)).contains("unsupported-format"))  // oslo: qed is always unsafe
        let vhdx = try create("vhdx", "10M")
        #expect(codes(verdict(vhdx)).contains("unsupported-format"))
        // A LUKS1 header (magic, version 1, cipher names), built by hand: qemu-img's own LUKS creation runs a
        // PBKDF benchmark that fails on a loaded machine ("Unable to get accurate CPU usage").
        var header = [UInt8](repeating: 0, count: 1 << 20)
        header.replaceSubrange(0..<6, with: [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe])
        header[7] = 1
        header.replaceSubrange(8..<11, with: Array("aes".utf8))
        header.replaceSubrange(40..<51, with: Array("xts-plain64".utf8))
        let luks = dir + "/x.luks"
        FileManager.default.createFile(atPath: luks, contents: Data(header))
        #expect(codes(verdict(luks)).contains("unsupported-format"))
        // Declared raw does not make them raw.
        #expect(!verdict(luks, .raw).safe)
    }

    @Test func gptAndMBRDisksAreRaw() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var data = [UInt8](repeating: 0, count: 512 * 10)
        data[510] = 0x55; data[511] = 0xaa
        data[446 + 2] = 0x02; data[446 + 4] = 0xee; data[446 + 8] = 1  // EFI protective partition
        let gpt = dir + "/gpt.img"
        FileManager.default.createFile(atPath: gpt, contents: Data(data))
        let v = verdict(gpt, .raw)
        #expect(v.safe && v.detected == .raw)
    }

    // MARK: oslo test_bad_iso_qcow2 / multiple matches.

    func iso(_ size: Int) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: size)
        b[0x8000] = 1
        b.replaceSubrange(0x8001..<0x8006, with: Array("CD001".utf8))
        return b
    }

    @Test func isoIsRawButAnISOWithAQcow2HeaderIsAPolyglot() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let plain = dir + "/plain.iso"
        FileManager.default.createFile(atPath: plain, contents: Data(iso(1 << 20)))
        #expect(verdict(plain, .raw).safe)
        let qcow = try create("qcow2", "10M")
        var bad = iso(1 << 20)
        let head = Array(FileManager.default.contents(atPath: qcow)!.prefix(32 * 1024))
        bad.replaceSubrange(0..<head.count, with: head)
        let badPath = dir + "/bad.iso"
        FileManager.default.createFile(atPath: badPath, contents: Data(bad))
        let v = verdict(badPath)
        #expect(codes(v).contains("multiple-formats"))
        #expect(v.reasons.first { $0.code == "multiple-formats" }!.message.contains("multiple formats detected"))
        #expect(v.signatures.sorted() == ["iso9660", "qcow2"])
        #expect(!verdict(badPath, .raw).safe)
        #expect(!verdict(badPath, .qcow2).safe)
    }

    // MARK: oslo test_vmdk_non_sparse_unsafe, bad descriptor offset and size.

    @Test func vmdkDescriptorTypesOtherThanSparseAreUnsafe() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for sub in ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
            let img = try create("vmdk", "10M", ["-o", "subformat=\(sub)"])
            let v = verdict(img, .vmdk)
            #expect(codes(v).contains("vmdk-create-type"), "\(sub): \(v.reasons)")
            #expect(v.reasons.first { $0.code == "vmdk-create-type" }!.message.contains("unsupported subformat"))
        }
    }

    @Test(arguments: ["monolithicSparse", "streamOptimized"])
    func vmdkWrongDescriptorLocationIsUnsafe(_ sub: String) throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = try create("vmdk", "10M", ["-o", "subformat=\(sub)"])
        try patch(img, at: 0x1c, le64(0x400 / 512))
        let v = verdict(img, .vmdk)
        #expect(!v.safe)
        #expect(v.reasons.contains { $0.message.contains("wrong descriptor location") })
    }

    @Test(arguments: ["monolithicSparse", "streamOptimized"])
    func vmdkHugeDescriptorSizeCostsNoMemory(_ sub: String) throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A 5 MiB allocated image whose descriptor claims to be 2 MiB long: still sized right, read in 64 KiB.
        try run(["dd", "if=/dev/urandom", "of=\(dir)/r.raw", "bs=1M", "count=5", "status=none"])
        let img = dir + "/big.vmdk"
        try run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", "-S", "0", dir + "/r.raw", img])
        try patch(img, at: 0x1c + 8, le64((2 << 20) / 512))
        let v = verdict(img, .vmdk)
        #expect(v.detected == .vmdk)
        #expect(v.virtualSize == 5 << 20)
        let m = try ImageOpener.open(path: img) as! VMDKImage
        #expect((m.descriptorText?.utf8.count ?? 0) <= 64 << 10)
    }

    // MARK: oslo test_qcow2_safety_checks and feature flags.

    @Test func qcow2BackingAndDataFilesAreUnsafe() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let backing = dir + "/backing"
        FileManager.default.createFile(atPath: backing, contents: Data("foobar".utf8))
        #expect(verdict(try create("qcow2", "5M"), .qcow2).safe)
        let withBacking = try create("qcow2", "5M", ["-b", backing, "-F", "raw"])
        #expect(codes(verdict(withBacking, .qcow2)).contains("backing-file"))
        let withJSON = try create("qcow2", "5M", ["-b", "json:{\"file.filename\":\"\(backing)\"}", "-F", "raw", "-u"])
        let jv = verdict(withJSON, .qcow2)
        #expect(jv.reasons.contains { $0.code == "backing-file" && $0.message.contains("json:") })
        let relative = try create("qcow2", "5M", ["-b", "../../../../etc/passwd", "-F", "raw", "-u"])
        #expect(verdict(relative, .qcow2).reasons.contains { $0.code == "backing-file" && $0.message.contains("leaves") })
        let withData = try create("qcow2", "5M", ["-o", "data_file=\(dir)/data,data_file_raw=on"])
        #expect(codes(verdict(withData, .qcow2)).contains("data-file"))
        // A non-qcow2 file declared qcow2 is a format error.
        #expect(codes(verdict(backing, .qcow2)) == ["format-mismatch"])
    }

    @Test func qcow2FeatureBitsAndVersions() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = try create("qcow2", "5M")
        func variant(_ patches: [(UInt64, [UInt8])]) throws -> SafetyVerdict {
            let p = dir + "/v-\(UUID().uuidString.prefix(6)).qcow2"
            try FileManager.default.copyItem(atPath: base, toPath: p)
            for (o, b) in patches { try patch(p, at: o, b) }
            return verdict(p, .qcow2)
        }
        #expect(try variant([]).safe)
        #expect(!(try variant([(0x48, [0x01])])).safe)  // highest-order incompatible bit: unknown
        #expect(try variant([(0x4f, [0x01])]).safe)  // the dirty bit is known
        #expect(!(try variant([(0x4f, [0x80])])).safe)  // bit 7: not assigned
        #expect(codes(try variant([(0x07, [0x01])])) == ["format-mismatch"])  // qcow v1: another format, not a qcow2
        #expect(!(try variant([(0x07, [0x04])])).safe)  // version 4
        // Version 2 has no feature fields: the same bytes there mean nothing.
        let v2 = dir + "/v2.qcow2"
        try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "5M"])
        try patch(v2, at: 0x48, [0x01])
        #expect(verdict(v2, .qcow2).safe, "\(verdict(v2, .qcow2).reasons)")
    }

    @Test func textIsRaw() throws {
        let v = verdict(#filePath)
        #expect(v.detected == .raw && v.safe && v.signatures.isEmpty)
    }

    // MARK: oslo test_vmdk_with_footer and test_vmdk_footer_checks.

    /// A streamOptimized VMDK with VMware's footer: header says GD_AT_END, the footer holds the real header.
    func vmdkWithFooter() throws -> (path: String, header: [UInt8]) {
        let img = try create("vmdk", "10M", ["-o", "subformat=streamOptimized"])
        let header = Array(FileManager.default.contents(atPath: img)!.prefix(512))
        var marker = [UInt8](repeating: 0, count: 512)
        marker[0] = 1; marker[12] = 3
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: img))
        try h.seekToEnd()
        h.write(Data(marker + header + [UInt8](repeating: 0, count: 512)))
        try h.close()
        try patch(img, at: 56, le64(.max))
        return (img, header)
    }

    @Test func vmdkFooterMustBeValid() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Zeros where the footer should be.
        let zero = try create("vmdk", "10M", ["-o", "subformat=streamOptimized"])
        try patch(zero, at: 56, le64(.max))
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: zero))
        try h.seekToEnd()
        h.write(Data(count: 1536))
        try h.close()
        #expect(!verdict(zero, .vmdk).safe)
        #expect(verdict(zero, .vmdk).reasons.contains { $0.message.contains("footer") })
        // A legitimate footer passes.
        let (good, _) = try vmdkWithFooter()
        #expect(verdict(good, .vmdk).safe, "\(verdict(good, .vmdk).reasons)")
        // Each way of breaking it fails.
        let size = try FileManager.default.attributesOfItem(atPath: good)[.size] as! UInt64
        let footer = size - 1024, markerAt = size - 1536, eos = size - 512
        let breaks: [(String, UInt64, [UInt8])] = [
            ("signature", footer, Array("leak".utf8)),
            ("version", footer + 4, [2]),
            ("descriptor size", footer + 36, [2]),
            ("descriptor offset", footer + 28, [3]),
            ("another footer", footer + 56, le64(.max)),
            ("footer marker type", markerAt + 12, [7]),
            ("footer marker size", markerAt + 8, [1]),
            ("footer marker padding", markerAt + 100, [1]),
            ("eos marker type", eos + 12, [7]),
            ("eos marker size", eos + 8, [1]),
            ("eos marker padding", eos + 100, [1]),
        ]
        for (what, offset, bytes) in breaks {
            let p = dir + "/f-\(UUID().uuidString.prefix(6)).vmdk"
            try FileManager.default.copyItem(atPath: good, toPath: p)
            try patch(p, at: offset, bytes)
            #expect(!verdict(p, .vmdk).safe, "\(what) was accepted")
        }
    }

    // MARK: oslo test_vmdk_safety_checks: the descriptor itself.

    func sparseWithDescriptor(_ lines: [String]) throws -> String {
        let img = try create("vmdk", "10M")
        var text = Array(lines.joined(separator: "\n").utf8)
        text += [UInt8](repeating: 0, count: 20 * 512 - text.count)
        try patch(img, at: 512, text)
        return img
    }

    @Test func vmdkDescriptorContentIsChecked() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var lines = ["# a comment", "createType monolithicFlat", "", " ", "someUnknownThing=foo", "ddb whatever",
                     "rw 0 somefile.vmdk"]
        #expect(verdict(try sparseWithDescriptor(lines), .vmdk).reasons.contains { $0.message.contains("unsupported subformat") })
        lines[1] = "createType=\"monolithicFlat\""
        #expect(verdict(try sparseWithDescriptor(lines), .vmdk).reasons.contains { $0.message.contains("unsupported subformat") })
        lines[1] = "createType=\"monolithicSparse\""
        let ok = verdict(try sparseWithDescriptor(lines), .vmdk)
        #expect(ok.safe, "\(ok.reasons)")
        lines.append("wronly 2048 somefile2.vmdk")
        #expect(verdict(try sparseWithDescriptor(lines), .vmdk).reasons.contains { $0.message.contains("descriptor data") })
        lines[lines.count - 1] = "rw 2048 /etc/hosts"
        #expect(verdict(try sparseWithDescriptor(lines), .vmdk).reasons.contains { $0.message.contains("extent filenames") })
        lines.removeLast(2)
        #expect(verdict(try sparseWithDescriptor(lines), .vmdk).reasons.contains { $0.message.contains("no extents") })
    }

    // MARK: What oslo misses: structural corruption, fixed VHDs, VHD and VDI parents, raw declarations.

    @Test func structuralCorruptionIsUnsafe() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = try create("qcow2", "10M")
        try run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k", img])
        var b = Array(FileManager.default.contents(atPath: img)!)
        let l1 = Int(b[40..<48].reduce(0) { $0 << 8 | UInt64($1) })
        let l2 = Int(b[l1..<(l1 + 8)].reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00)
        // Second data cluster points at the first: two guest clusters share one host cluster.
        b.replaceSubrange((l2 + 8)..<(l2 + 16), with: Array(b[l2..<(l2 + 8)]))
        FileManager.default.createFile(atPath: img, contents: Data(b))
        #expect(codes(verdict(img, .qcow2)).contains("corrupt"))
        // convert runs the structural check alongside the copy and gates the rename on it: refused, nothing left.
        let out = dir + "/out.raw"
        let r = try run([imgconvBinary, "convert", "-O", "raw", img, out], allowFailure: true)
        #expect(r.status == 1 && r.err.contains("corrupt"), "\(r.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.contains("out.raw") } == [])
        // With -n (in place) nothing can be held back, so the check runs first and the target is untouched.
        FileManager.default.createFile(atPath: out, contents: Data(repeating: 7, count: 10 << 20))
        let n = try run([imgconvBinary, "convert", "-n", "-O", "raw", img, out], allowFailure: true)
        #expect(n.status == 1 && n.err.contains("corrupt"))
        #expect(FileManager.default.contents(atPath: out) == Data(repeating: 7, count: 10 << 20))
    }

    @Test func fixedVHDIsVPCNotRaw() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = try create("vpc", "10M", ["-o", "subformat=fixed"])
        let v = verdict(img)
        #expect(v.detected == .vpc && v.safe)
        #expect(codes(verdict(img, .raw)) == ["format-mismatch"])
    }

    @Test func vhdAndVDIParentsAreUnsafe() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A differencing VHD: the dynamic disk made differencing, with a parent locator pointing at a host path.
        let img = try create("vpc", "10M")
        var b = Array(FileManager.default.contents(atPath: img)!)
        func be32(_ o: Int, _ v: UInt32) { for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
        be32(60, 4)
        be32(64, 0)
        be32(64, VPCImage.checksum(Array(b[0..<512]), skipping: 64..<68))
        be32(512 + 576, 0x5732_6b75)  // "W2ku" locator
        FileManager.default.createFile(atPath: img, contents: Data(b))
        let v = verdict(img, .vpc)
        #expect(codes(v).contains("vhd-parent"))
        #expect(codes(v).contains("vhd-parent-locator"))
        let vdi = try create("vdi", "10M")
        try patch(vdi, at: 440, [0x42])
        #expect(codes(verdict(vdi, .vdi)) == ["vdi-parent"])
    }

    @Test func cve202440767RawDeclarationsAreChecked() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(codes(verdict(try create("qcow2", "10M"), .raw)) == ["format-mismatch"])
        let desc = try create("vmdk", "10M", ["-o", "subformat=monolithicFlat"])
        #expect(codes(verdict(desc, .raw)) == ["format-mismatch"])
    }

    // MARK: no host file ever reaches an output.

    @Test func hostFilesNeverReachAnOutput() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A stand-in for /etc/passwd, so the test never depends on (or touches) the real one.
        let secret = dir + "/passwd"
        let marker = "root:x:0:0:imgconv-secret-marker:/root:/bin/bash\n"
        FileManager.default.createFile(atPath: secret, contents: Data(String(repeating: marker, count: 2000).utf8))
        func outputLeaks(_ path: String) -> Bool {
            guard let d = FileManager.default.contents(atPath: path) else { return false }
            return d.range(of: Data("imgconv-secret-marker".utf8)) != nil
        }
        // 1. A VMDK descriptor whose flat extent is the secret, by absolute path and by name.
        for name in [secret, "passwd", "../\(URL(fileURLWithPath: dir).lastPathComponent)/passwd"] {
            let vmdk = dir + "/evil.vmdk"
            let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"\(name)\" 0\n"
            FileManager.default.createFile(atPath: vmdk, contents: Data(text.utf8))
            for extra in [[String](), ["--trusted"], ["--trusted", "--allow-extent-files"]] where !(name == "passwd" && extra.count == 2) {
                let out = dir + "/out.raw"
                let r = try run([imgconvBinary, "convert"] + extra + ["-O", "raw", vmdk, out], allowFailure: true)
                #expect(r.status == 1, "\(name) \(extra)")
                #expect(!outputLeaks(out))
            }
        }
        // 2. A qcow2 whose external data file is the secret.
        let q = dir + "/evil.qcow2"
        try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=\(dir)/data.bin,data_file_raw=on", q, "1M"])
        try run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", q])
        try FileManager.default.removeItem(atPath: dir + "/data.bin")
        try FileManager.default.createSymbolicLink(atPath: dir + "/data.bin", withDestinationPath: secret)
        for extra in [[String](), ["--trusted"]] {
            let r = try run([imgconvBinary, "convert"] + extra + ["-O", "raw", q, dir + "/q.raw"], allowFailure: true)
            #expect(r.status == 1)
            #expect(!outputLeaks(dir + "/q.raw"))
        }
        // 3. A qcow2 whose backing file is the secret: the output has the overlay's own clusters only.
        let b = dir + "/evil-backing.qcow2"
        try run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", b, "1M"])
        let r = try run([imgconvBinary, "convert", "-O", "raw", b, dir + "/b.raw"], allowFailure: true)
        #expect(r.status == 1 && r.err.contains("backing-file"))
        try run([imgconvBinary, "convert", "--trusted", "-O", "raw", b, dir + "/b.raw"])
        #expect(!outputLeaks(dir + "/b.raw"))
    }
}
