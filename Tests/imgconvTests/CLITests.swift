import Foundation
import Testing

let samples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("samples").path

/// The CLI's contract: exit codes, refusals and messages. No qemu-img needed.
@Suite("imgconv CLI")
struct CLITests {
    @Test func declaredFormatMismatchExitsOneWithAClearMessage() throws {
        let r = try run([imgconvBinary, "info", "-f", "raw", samples + "/qcow2-v3.qcow2"], allowFailure: true)
        #expect(r.status == 1)
        #expect(r.err.contains("declared as 'raw' but its content is 'qcow2'"))
        let r2 = try run([imgconvBinary, "convert", "-f", "vmdk", "-O", "raw", samples + "/vpc-dynamic.vhd", "/tmp/never"], allowFailure: true)
        #expect(r2.status == 1)
        #expect(!FileManager.default.fileExists(atPath: "/tmp/never"))
        let r3 = try run([imgconvBinary, "info", "-f", "vhd", samples + "/vpc-dynamic.vhd"])
        #expect(r3.out.contains("file format: vpc"))
    }

    @Test func infoJSONHasQemuKeys() throws {
        let out = try run([imgconvBinary, "info", "--output", "json", samples + "/qcow2-zlib.qcow2"]).out
        let j = try parseJSON(out) as! [String: Any]
        #expect(j["format"] as? String == "qcow2")
        #expect(j["virtual-size"] as? Int == 2 * 1024 * 1024 + 512)
        #expect(j["cluster-size"] as? Int == 65536)
        let data = (j["format-specific"] as! [String: Any])["data"] as! [String: Any]
        #expect(data["compat"] as? String == "1.1")
        #expect(data["refcount-bits"] as? Int == 16)
        #expect(data["compression-type"] as? String == "zlib")
        // qemu-img's spelling is accepted too.
        #expect(try run([imgconvBinary, "info", "--output=json", samples + "/qcow2-zlib.qcow2"]).out == out)
    }

    @Test func checkExitCodes() throws {
        let dir = try temporaryDirectory("check")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var good = Array(FileManager.default.contents(atPath: samples + "/qcow2-v3.qcow2")!)
        #expect(try run([imgconvBinary, "check", samples + "/qcow2-v3.qcow2"]).status == 0)
        // Leak: raise the refcount of a cluster nothing uses (one appended to the file).
        let rt = Int(good[48..<56].reduce(0) { $0 << 8 | UInt64($1) })
        let rb = Int(good[rt..<(rt + 8)].reduce(0) { $0 << 8 | UInt64($1) })
        let clusters = good.count / 65536
        var leaky = good + [UInt8](repeating: 0, count: 65536)
        leaky[rb + clusters * 2 + 1] = 1
        FileManager.default.createFile(atPath: dir + "/leaky.qcow2", contents: Data(leaky))
        let r = try run([imgconvBinary, "check", dir + "/leaky.qcow2"], allowFailure: true)
        #expect(r.status == 3, "\(r.out)")
        #expect(r.out.contains("leaked clusters"))
        // Corruption: the header cluster's refcount set to zero.
        good[rb + 1] = 0
        FileManager.default.createFile(atPath: dir + "/corrupt.qcow2", contents: Data(good))
        let c = try run([imgconvBinary, "check", "--output", "json", dir + "/corrupt.qcow2"], allowFailure: true)
        #expect(c.status == 2)
        #expect((try parseJSON(c.out) as! [String: Any])["corruptions"] as? Int ?? 0 >= 1)
        // A missing file is an error of the check itself.
        #expect(try run([imgconvBinary, "check", dir + "/missing.qcow2"], allowFailure: true).status == 1)
    }

    @Test func convertWritesSparseRawAndNoTemporaries() throws {
        let dir = try temporaryDirectory("convert")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try run([imgconvBinary, "convert", "-O", "raw", samples + "/vmdk-stream-optimized.vmdk", dir + "/out.raw"])
        let out = FileManager.default.contents(atPath: dir + "/out.raw")!
        let base = FileManager.default.contents(atPath: samples + "/base.raw")!
        #expect(out == base)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["out.raw"])
    }

    @Test func interruptedConvertLeavesNoPartialFile() throws {
        // SIGINT as soon as the temporary output appears: the converter stops at its next chunk and removes it.
        let dir = try temporaryDirectory("sigint")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        FileManager.default.createFile(atPath: dir + "/big.raw", contents: nil)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/big.raw"))
        let chunk = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 | 1) })
        for _ in 0..<1024 { h.write(chunk) }  // 1 GiB of data, nothing zero
        try h.close()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: imgconvBinary)
        p.arguments = ["convert", "-O", "raw", dir + "/big.raw", dir + "/out.raw"]
        try p.run()
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
            if names.contains(where: { $0.contains(".imgconv-") }) { break }
            usleep(200)
        }
        p.interrupt()
        p.waitUntilExit()
        #expect(p.terminationStatus == 1)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir)
        #expect(names == ["big.raw"], "left behind: \(names)")
    }

    @Test func vmdkDescriptorExtentsNeedExplicitPermission() throws {
        let r = try run([imgconvBinary, "convert", "-O", "raw", samples + "/vmdk-monolithic-flat.vmdk", "/tmp/imgconv-never.raw"],
                        allowFailure: true)
        #expect(r.status == 1)
        #expect(r.err.contains("not safe"))
        #expect(r.err.contains("vmdk-create-type"))
        // Trusted, extents still need their own permission.
        let t = try run([imgconvBinary, "convert", "--trusted", "-O", "raw", samples + "/vmdk-monolithic-flat.vmdk",
                         "/tmp/imgconv-never.raw"], allowFailure: true)
        #expect(t.status == 1)
        #expect(t.err.contains("never opens by default"))
        // info still reports the descriptor and its extents.
        let info = try run([imgconvBinary, "info", samples + "/vmdk-monolithic-flat.vmdk"]).out
        #expect(info.contains("create type: monolithicFlat"))
        #expect(info.contains("vmdk-monolithic-flat-flat.vmdk"))
    }
}
