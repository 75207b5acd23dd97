import Foundation
import Testing

/// `imgconv convert` options beyond the format: -n, --target-is-zero, --progress json, -o validation, -t.
@Suite("imgconv convert options")
struct ConvertCLITests {
    let base = samples + "/base.raw"

    @Test func writesIntoAnExistingTargetAndZeroesWhatItSkips() throws {
        let dir = try temporaryDirectory("inplace")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let baseBytes = FileManager.default.contents(atPath: base)!
        // An existing target full of garbage: -n must leave exactly the source behind.
        FileManager.default.createFile(atPath: dir + "/t.raw", contents: Data(repeating: 0xaa, count: baseBytes.count))
        try run([imgconvBinary, "convert", "-n", "-O", "raw", samples + "/qcow2-zlib.qcow2", dir + "/t.raw"])
        #expect(FileManager.default.contents(atPath: dir + "/t.raw") == baseBytes)
        // With --target-is-zero the skipped ranges are trusted to be zero and left alone.
        FileManager.default.createFile(atPath: dir + "/z.raw", contents: Data(repeating: 0xaa, count: baseBytes.count))
        try run([imgconvBinary, "convert", "-n", "--target-is-zero", "-O", "raw", samples + "/qcow2-zlib.qcow2", dir + "/z.raw"])
        let z = FileManager.default.contents(atPath: dir + "/z.raw")!
        #expect(z != baseBytes)
        #expect(z[0..<65536] == baseBytes[0..<65536])
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == ["t.raw", "z.raw"])
        // -n needs an existing target of at least the image's size, and raw output.
        let r = try run([imgconvBinary, "convert", "-n", "-O", "qcow2", base, dir + "/t.raw"], allowFailure: true)
        #expect(r.status == 1 && r.err.contains("raw output only"))
    }

    @Test func progressAsJSONLines() throws {
        let dir = try temporaryDirectory("progress")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try run([imgconvBinary, "convert", "--progress=json", "-O", "qcow2", base, dir + "/p.qcow2"])
        let lines = r.err.split(separator: "\n").map { try! parseJSON(String($0)) as! [String: Any] }
        #expect(lines.count >= 2)
        #expect(lines.last?["event"] as? String == "done")
        #expect(lines.last?["virtual-size"] as? Int == 2 * 1024 * 1024 + 512)
        let percents = lines.dropLast().map { $0["percent"] as! Double }
        #expect(percents == percents.sorted())
        #expect(percents.last == 100)
    }

    @Test func badOptionsFailBeforeAnyWork() throws {
        let dir = try temporaryDirectory("opts")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (args, message) in [
            (["-O", "qcow2", "-o", "cluster_size=1000"], "cluster_size=1000"),
            (["-O", "qcow2", "-o", "frobnicate=1"], "'frobnicate' is not an option of the qcow2 output"),
            (["-O", "vpc", "-c"], "vpc output cannot be compressed"),
            (["-O", "vmdk", "-o", "subformat=monolithicFlat"], "subformat=monolithicFlat"),
            (["-O", "qed"], "unknown format 'qed'"),
            (["-O", "raw", "-t", "sometimes"], "-t sometimes"),
            (["-O", "qcow2", "-o", "compat=0.10,compression_type=zstd"], "zstd"),
        ] {
            let r = try run([imgconvBinary, "convert"] + args + [base, dir + "/out"], allowFailure: true)
            #expect(r.status == 1, "\(args)")
            #expect(r.err.contains(message), "\(args): \(r.err)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
    }

    @Test func unsafeCacheModeStillRenamesAtomically() throws {
        let dir = try temporaryDirectory("unsafe")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try run([imgconvBinary, "convert", "-t", "unsafe", "-O", "vdi", base, dir + "/u.vdi"])
        try run([imgconvBinary, "convert", "-O", "raw", dir + "/u.vdi", dir + "/u.raw"])
        #expect(FileManager.default.contents(atPath: dir + "/u.raw") == FileManager.default.contents(atPath: base))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == ["u.raw", "u.vdi"])
    }

    @Test func workersDoNotChangeTheResult() throws {
        let dir = try temporaryDirectory("workers")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for m in ["1", "3", "8"] {
            try run([imgconvBinary, "convert", "-m", m, "-c", "-O", "qcow2", base, dir + "/m\(m).qcow2"])
            try run([imgconvBinary, "convert", "-O", "raw", dir + "/m\(m).qcow2", dir + "/m\(m).raw"])
            #expect(FileManager.default.contents(atPath: dir + "/m\(m).raw") == FileManager.default.contents(atPath: base))
        }
    }

    @Test func virtualSizeLimitIsConfigurable() throws {
        let r = try run([imgconvBinary, "inspect", "--max-virtual-size", "1M", samples + "/qcow2-v3.qcow2"], allowFailure: true)
        #expect(r.status == 4)
        #expect(r.out.contains("limit:"))
        let c = try run([imgconvBinary, "convert", "--max-virtual-size", "1M", "-O", "raw", samples + "/qcow2-v3.qcow2", "/tmp/imgconv-never"],
                        allowFailure: true)
        #expect(c.status == 1)
        #expect(!FileManager.default.fileExists(atPath: "/tmp/imgconv-never"))
        #expect(try run([imgconvBinary, "inspect", "--max-virtual-size", "3M", samples + "/qcow2-v3.qcow2"]).status == 0)
        #expect(try run([imgconvBinary, "inspect", "--max-virtual-size", "lots", samples + "/qcow2-v3.qcow2"], allowFailure: true).status != 0)
    }
}
