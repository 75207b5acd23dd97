import Foundation
import ImageFixture
import ImageFormats
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Runs the imgconv binary and returns its exit status, its peak resident memory and its standard output.
///
/// The peak comes from wait4's rusage of that child alone, measured through a small Python parent that forks:
/// Linux carries a process's peak across exec, and a child spawned straight from this test process (vfork)
/// would start with the test process's own hundreds of MiB.
func runMeasured(_ args: [String]) throws -> (status: Int32, maxRSS: Int, out: String) {
    let script = """
    import os, sys
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        os.execv(sys.argv[1], sys.argv[1:])
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    sys.stderr.write("%d %d\\n" % (code if code >= 0 else 128 - code, usage.ru_maxrss * 1024))
    """
    let r = try run(["python3", "-c", script, imgconvBinary] + args, allowFailure: true)
    let fields = r.err.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int($0) }
    guard fields.count == 2 else { throw POSIXError(.EIO) }
    return (Int32(fields[0]), fields[1], r.out)
}

/// Sparse files whose headers describe tables as large as a 4 GiB file allows, filled as an attacker would.
enum Forged {
    static let fileSize: UInt64 = 4 << 30

    static func write(_ path: String, _ pieces: [(UInt64, [UInt8])]) throws {
        FileManager.default.createFile(atPath: path, contents: nil)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.truncate(atOffset: fileSize)
        for (offset, bytes) in pieces {
            try h.seek(toOffset: offset)
            h.write(Data(bytes))
        }
    }

    static func le32s(_ values: [UInt32]) -> [UInt8] {
        values.withUnsafeBufferPointer { b in Array(UnsafeRawBufferPointer(b)) }
    }

    /// A monolithicSparse VMDK of 8 TiB: 32 Mi grain directory entries (qemu's limit, 128 MiB). `spread` points
    /// each at its own grain table across the file; otherwise every entry names one table.
    static func vmdk(_ path: String, spread: Bool) throws {
        var h = [UInt8](repeating: 0, count: 512)
        h.replaceSubrange(0..<4, with: Array("KDMV".utf8))
        func le(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { h[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        le(4, 1, 4); le(8, 3, 4)
        let entries = 32 << 20, gtes = 512
        le(12, UInt64(entries * gtes), 8)  // capacity in sectors: 1-sector grains
        le(20, 1, 8)
        le(44, UInt64(gtes), 4)
        le(56, 2, 8)  // grain directory at sector 2
        h.replaceSubrange(73..<77, with: [0x0a, 0x20, 0x0d, 0x0a])
        let sectors = UInt32(fileSize / 512)
        let first = UInt32(2 + entries * 4 / 512 + 1)
        let gd = (0..<entries).map { spread ? (first &+ UInt32($0) &* 4) % (sectors - 8) : 300_000 }
        try write(path, [(0, h), (1024, le32s(gd))])
    }

    /// A dynamic VHD of 256 GiB with 512-byte blocks: a 2 GiB BAT of zeros, every block at offset 0.
    static func vhd(_ path: String) throws {
        func footer() -> [UInt8] {
            var f = [UInt8](repeating: 0, count: 512)
            f.replaceSubrange(0..<8, with: Array("conectix".utf8))
            func be(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { f[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - i))) } }
            be(8, 2, 4); be(12, 0x10000, 4); be(16, 512, 8)
            f.replaceSubrange(28..<32, with: Array("qem2".utf8))
            be(40, 256 << 30, 8); be(48, 256 << 30, 8)
            be(56, 65535, 2); f[58] = 16; f[59] = 255
            be(60, 3, 4)
            be(64, UInt64(VPCImage.checksum(f, skipping: 64..<68)), 4)
            return f
        }
        var d = [UInt8](repeating: 0, count: 1024)
        d.replaceSubrange(0..<8, with: Array("cxsparse".utf8))
        func be(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { d[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - i))) } }
        be(8, .max, 8); be(16, 1536, 8); be(24, 0x10000, 4); be(28, (256 << 30) / 512, 4); be(32, 512, 4)
        try write(path, [(0, footer()), (512, d), (fileSize - 512, footer())])
    }

    /// A VDI of 64 TiB: a 256 MiB block map of zeros (every block is data block 0).
    static func vdi(_ path: String) throws {
        var h = [UInt8](repeating: 0, count: 512)
        func le(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { h[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        le(0x40, 0xbeda_107f, 4); le(0x44, 0x0001_0001, 4); le(72, 400, 4); le(76, 1, 4)
        le(340, 1 << 20, 4); le(344, 512 << 20, 4); le(360, 512, 4)
        le(368, 64 << 40, 8); le(376, 1 << 20, 4); le(384, 64 << 20, 4)
        try write(path, [(0, h)])
    }

    /// A qcow2 of 128 GiB with 512-byte clusters: a 32 MiB L1 table (qemu's limit) whose entries all name one
    /// L2 table, and a file of 8 Mi clusters for the refcount check to count.
    static func qcow2(_ path: String) throws {
        var h = [UInt8](repeating: 0, count: 512)
        func be(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { h[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - i))) } }
        h.replaceSubrange(0..<4, with: [0x51, 0x46, 0x49, 0xfb])
        be(4, 3, 4); be(20, 9, 4); be(24, 128 << 30, 8)
        let l1Entries = 4 << 20
        be(36, UInt64(l1Entries), 4); be(40, 1024, 8)  // L1 at 1 KiB
        be(48, 512, 8); be(56, 1, 4)                    // refcount table: one cluster at 512
        be(96, 4, 4); be(100, 104, 4)
        var l1 = [UInt8](repeating: 0, count: l1Entries * 8)
        let l2: UInt64 = 64 << 20
        for i in 0..<l1Entries { for k in 0..<8 { l1[i * 8 + k] = UInt8(truncatingIfNeeded: l2 >> (8 * UInt64(7 - k))) } }
        try write(path, [(0, h), (1024, l1)])
    }
}

/// Hostile images: bounded memory and time, a clear refusal, and the process alive.
@Suite("hostile images", .serialized)
struct HostileImageTests {
    /// Peak memory of `imgconv info` and `imgconv inspect` on any image stays under this.
    static let rssLimit = 64 << 20

    @Test(arguments: ["vmdk-same-table", "vmdk-spread", "vhd", "vdi", "qcow2"])
    func forgedFourGiBImagesStayUnder64MiB(kind: String) throws {
        let dir = try temporaryDirectory("forged")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/forged.\(kind)"
        switch kind {
        case "vmdk-same-table": try Forged.vmdk(path, spread: false)
        case "vmdk-spread": try Forged.vmdk(path, spread: true)
        case "vhd": try Forged.vhd(path)
        case "vdi": try Forged.vdi(path)
        default: try Forged.qcow2(path)
        }
        for command in ["info", "inspect"] {
            let started = Date()
            let r = try runMeasured([command, path])
            let seconds = Date().timeIntervalSince(started)
            // Refused (inspect exits 4, info prints UNSAFE), not crashed, and bounded.
            #expect(command == "inspect" ? r.status == 4 : r.status == 0, "\(command) \(kind): exit \(r.status): \(r.out.prefix(600))")
            #expect(r.out.contains("UNSAFE"), "\(command) \(kind): \(r.out.prefix(600))")
            #expect(r.maxRSS < Self.rssLimit, "\(command) \(kind): peak RSS \(r.maxRSS >> 20) MiB")
            print("forged \(kind): imgconv \(command): peak RSS \(r.maxRSS >> 20) MiB, \(String(format: "%.1f", seconds)) s")
        }
    }

    @Test func samplesStayUnder64MiB() throws {
        for name in ["qcow2-zlib.qcow2", "qcow2-512.qcow2", "vmdk-stream-optimized.vmdk", "vpc-dynamic.vhd", "vdi-dynamic.vdi"] {
            let r = try runMeasured(["info", samplesDir + "/" + name])
            #expect(r.status == 0 && r.out.contains("safety: safe"), "\(name): \(r.out)")
            #expect(r.maxRSS < Self.rssLimit, "\(name): peak RSS \(r.maxRSS >> 20) MiB")
        }
    }
}

let samplesDir: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("samples").path

/// Formats imgconv recognises but does not read, made by qemu-img itself: named as qemu-img names them, with the
/// same virtual size, and refused (never read as raw, not even when raw is declared).
@Suite("foreign formats against qemu-img", .enabled(if: qemuAvailable))
struct ForeignOracleTests {
    static let made: [(String, [String])] = [
        ("qcow", ["qemu-img", "create", "-f", "qcow", "$IMG", "3M"]),
        ("qed", ["qemu-img", "create", "-f", "qed", "$IMG", "5M"]),
        ("vhdx", ["qemu-img", "create", "-f", "vhdx", "$IMG", "7M"]),
        ("parallels", ["qemu-img", "create", "-f", "parallels", "$IMG", "9M"]),
        ("luks", ["qemu-img", "create", "-f", "luks", "--object", "secret,id=s0,data=imgconv", "-o", "key-secret=s0,iter-time=50",
                  "$IMG", "1M"]),
    ]

    @Test(arguments: made.map(\.0))
    func namedAsQemuImgNamesThemAndRefused(format: String) throws {
        let dir = try temporaryDirectory("foreign")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = dir + "/image.\(format)"
        // qemu-img times LUKS's key derivation with getrusage, and on a loaded machine it may fail with "Unable to
        // get accurate CPU usage": the oracle is asked again.
        let command = Self.made.first { $0.0 == format }!.1.map { $0 == "$IMG" ? img : $0 }
        var made = try run(command, allowFailure: true)
        for _ in 0..<4 where made.status != 0 { made = try run(command, allowFailure: true) }
        try #require(made.status == 0, "\(made)")
        let qemu = try parseJSON(try run(["qemu-img", "info", "--output=json", img]).out) as! [String: Any]
        let ours = try parseJSON(try run([imgconvBinary, "info", "--output", "json", img]).out) as! [String: Any]
        #expect(ours["format"] as? String == qemu["format"] as? String)
        #expect(ours["format"] as? String == format)
        #expect((ours["virtual-size"] as? NSNumber)?.uint64Value == (qemu["virtual-size"] as? NSNumber)?.uint64Value)
        if let cs = qemu["cluster-size"] as? NSNumber { #expect((ours["cluster-size"] as? NSNumber) == cs) }
        let safety = ours["safety"] as? [String: Any]
        #expect(safety?["safe"] as? Bool == false)
        // inspect refuses; convert refuses and leaves nothing; declared raw is a mismatch, not a raw read.
        let inspect = try run([imgconvBinary, "inspect", img], allowFailure: true)
        #expect(inspect.status == 4 && inspect.out.contains("unsupported-format"), "\(inspect)")
        let asRaw = try run([imgconvBinary, "inspect", "-f", "raw", img], allowFailure: true)
        #expect(asRaw.status == 4 && asRaw.out.contains("format-mismatch"), "\(asRaw)")
        let convert = try run([imgconvBinary, "convert", "-f", "raw", "-O", "raw", img, dir + "/out.raw"], allowFailure: true)
        #expect(convert.status != 0 && !FileManager.default.fileExists(atPath: dir + "/out.raw"))
        let trusted = try run([imgconvBinary, "convert", "--trusted", "-O", "raw", img, dir + "/out2.raw"], allowFailure: true)
        #expect(trusted.status != 0 && trusted.err.contains("does not read"), "\(trusted.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/out2.raw"))
    }

    /// Bochs and cloop have no qemu-img create: written by hand, then checked against qemu-img info.
    @Test func bochsAndCloopAsQemuReadsThem() throws {
        let dir = try temporaryDirectory("foreign-hand")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var bochs = [UInt8](repeating: 0, count: 512 + 8 * 4)
        bochs.replaceSubrange(0..<23, with: Array("Bochs Virtual HD Image".utf8) + [0])
        bochs.replaceSubrange(32..<40, with: Array("Redolog".utf8) + [0])
        bochs.replaceSubrange(48..<56, with: Array("Growing".utf8) + [0])
        func le(_ b: inout [UInt8], _ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        le(&bochs, 64, 0x0002_0000, 4); le(&bochs, 68, 512, 4); le(&bochs, 72, 8, 4); le(&bochs, 76, 512, 4)
        le(&bochs, 80, 512 << 10, 4); le(&bochs, 88, 4 << 20, 8)
        for i in 0..<8 { le(&bochs, 512 + i * 4, 0xffff_ffff, 4) }
        var cloop = [UInt8](repeating: 0, count: 136 + 5 * 8)
        let magic = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)
        cloop.replaceSubrange(0..<magic.count, with: magic)
        func be(_ b: inout [UInt8], _ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - i))) } }
        be(&cloop, 128, 65536, 4); be(&cloop, 132, 4, 4)
        for i in 0..<5 { be(&cloop, 136 + i * 8, 176, 8) }
        for (name, bytes) in [("bochs", bochs), ("cloop", cloop)] {
            let img = dir + "/image.\(name)"
            FileManager.default.createFile(atPath: img, contents: Data(bytes))
            let qemu = try parseJSON(try run(["qemu-img", "info", "--output=json", img]).out) as! [String: Any]
            let ours = try parseJSON(try run([imgconvBinary, "info", "--output", "json", img]).out) as! [String: Any]
            #expect(qemu["format"] as? String == name)
            #expect(ours["format"] as? String == name)
            #expect((ours["virtual-size"] as? NSNumber)?.uint64Value == (qemu["virtual-size"] as? NSNumber)?.uint64Value)
            let inspect = try run([imgconvBinary, "inspect", "-f", "raw", img], allowFailure: true)
            #expect(inspect.status == 4 && inspect.out.contains("format-mismatch"), "\(inspect)")
        }
    }

    /// A writer with lazy refcounts crashed (qemu-io's abort): the dirty bit is set and the refcounts are stale
    /// by design. imgconv reads it as qemu does; check still reports the refcounts; an overlap with metadata
    /// still makes such an image unsafe.
    @Test func dirtyImageWithLazyRefcountsIsReadable() throws {
        let dir = try temporaryDirectory("lazy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = dir + "/lazy.qcow2"
        try run(["qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "8M"])
        _ = try run(["qemu-io", "-c", "write -P 0x33 0 1M", "-c", "write -P 0x44 5M 64k", "-c", "abort", img], allowFailure: true)
        let info = try parseJSON(try run(["qemu-img", "info", "--output=json", img]).out) as! [String: Any]
        #expect(info["dirty-flag"] as? Bool == true, "qemu-io's abort leaves the image dirty")
        let inspect = try run([imgconvBinary, "inspect", img], allowFailure: true)
        #expect(inspect.status == 0 && inspect.out.contains(": safe"), "\(inspect)")
        let check = try run([imgconvBinary, "check", img], allowFailure: true)
        let qcheck = try run(["qemu-img", "check", img], allowFailure: true)
        #expect(check.status == 2 && qcheck.status == 2)
        #expect(check.out.contains("refcount=0 reference=1"))
        try run([imgconvBinary, "convert", "-O", "raw", img, dir + "/ours.raw"])
        try run(["qemu-img", "convert", "-O", "raw", img, dir + "/qemu.raw"])
        #expect(try sha256(dir + "/ours.raw") == (try sha256(dir + "/qemu.raw")))

        // The same image with a data cluster pointed at the L1 table: stale refcounts do not excuse that.
        var bytes = [UInt8](FileManager.default.contents(atPath: img)!)
        let l1 = Int(bytes.be64(40))
        let l2 = Int(bytes.be64(l1) & 0x00ff_ffff_ffff_fe00)
        let entry = UInt64(l1) | 1 << 63
        bytes.replaceSubrange((l2 + 8)..<(l2 + 16), with: (0..<8).map { UInt8(truncatingIfNeeded: entry >> (8 * UInt64(7 - $0))) })
        let bad = dir + "/overlap.qcow2"
        FileManager.default.createFile(atPath: bad, contents: Data(bytes))
        let refused = try run([imgconvBinary, "inspect", bad], allowFailure: true)
        #expect(refused.status == 4 && refused.out.contains("overlaps an L1 table"), "\(refused)")
    }
}

extension Array where Element == UInt8 {
    func be64(_ o: Int) -> UInt64 { self[o..<(o + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
}

/// The test fixture's fast compressed qcow2 is a qcow2 qemu-img finds clean and reads as the pattern.
@Suite("image fixture", .enabled(if: qemuAvailable))
struct ImageFixtureTests {
    @Test func compressedQcow2IsValid() throws {
        let dir = try temporaryDirectory("fixture")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = dir + "/pattern.qcow2"
        FileManager.default.createFile(atPath: img, contents: Data(CompressedQcow2.make(clusters: 9000, byte: 0x33)))
        let check = try run(["qemu-img", "check", img], allowFailure: true)
        #expect(check.status == 0, "\(check.out)")
        try run(["qemu-img", "convert", "-O", "raw", img, dir + "/out.raw"])
        let expected = [UInt8](repeating: 0x33, count: 9000 * 65536)
        #expect(FileManager.default.contents(atPath: dir + "/out.raw") == Data(expected))
        let ours = try run([imgconvBinary, "inspect", img])
        #expect(ours.out.contains(": safe"))
    }
}
