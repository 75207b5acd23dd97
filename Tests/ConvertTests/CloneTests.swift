import Foundation
import Testing
@testable import Convert
import ImageFormats
import SystemIO

/// A directory on a file system that shares extents (XFS with reflink: scripts/reflink-fs.sh, which
/// scripts/test.sh mounts and names in IMGCONV_REFLINK_DIR). IMGCONV_REQUIRE_REFLINK=1 makes its absence a failure.
let reflinkDir: String? = {
    let env = ProcessInfo.processInfo.environment
    if let dir = env["IMGCONV_REFLINK_DIR"], FileManager.default.fileExists(atPath: dir) { return dir }
    if env["IMGCONV_REQUIRE_REFLINK"] == "1" {
        fatalError("IMGCONV_REQUIRE_REFLINK=1 but IMGCONV_REFLINK_DIR is not a directory: bash scripts/reflink-fs.sh start")
    }
    return nil
}()

/// A fresh directory on the reflink file system.
func reflinkTemp() throws -> String {
    let dir = reflinkDir! + "/clone-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Bytes of `path` the kernel reports as shared with another file (FIEMAP's FIEMAP_EXTENT_SHARED, via filefrag).
func sharedBytes(_ path: String) throws -> UInt64 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/sbin/filefrag")
    p.arguments = ["-v", "-b4096", path]
    let pipe = Pipe()
    p.standardOutput = pipe
    try p.run()
    let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    // "   0:        0..   76799:      77111..    153910:  76800:             last,shared"
    var blocks: UInt64 = 0
    for line in out.split(separator: "\n") where line.contains("shared") {
        let fields = line.split(separator: ":").map { $0.trimmingCharacters(in: .whitespaces) }
        if fields.count >= 4, let n = UInt64(fields[3]) { blocks += n }
    }
    return blocks * 4096
}

/// A raw sink that offers to clone and then refuses, as XFS made without reflink does.
final class RefusingCloneSink: ExtentCloningSink {
    let inner: RawFileSink
    var attempts = 0
    init(path: String) { inner = RawFileSink(path: path) }
    var unit: Int { inner.unit }
    var outputFile: OutputFile? { inner.outputFile }
    func begin(virtualSize: UInt64) throws { try inner.begin(virtualSize: virtualSize) }
    func write(_ run: EncodedRun) throws { try inner.write(run) }
    func zero(at offset: UInt64, length: UInt64) throws { try inner.zero(at: offset, length: length) }
    func finish() throws { try inner.finish() }
    func abort() { inner.abort() }
    func cloneAlignment(from source: FileStorage) -> UInt64? { 4096 }
    func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws {
        attempts += 1
        throw FileError("FICLONERANGE", path: "test", errno: EOPNOTSUPP)
    }
}

@Suite("extent sharing")
struct CloneTests {
    /// What each sample stores verbatim at 4 KiB-aligned host offsets is cloned (qcow2 merges contiguous clusters,
    /// so even 512-byte ones can be); the rest (compressed clusters, VDI's and VHD's blocks at sector offsets) is
    /// read and written. Either way the output is the image's content.
    @Test(.enabled(if: reflinkDir != nil, "no reflink file system (IMGCONV_REFLINK_DIR)"),
          arguments: [("qcow2-v3.qcow2", true), ("qcow2-v2.qcow2", true), ("base.raw", true), ("qcow2-zlib.qcow2", true),
                      ("qcow2-512.qcow2", true), ("vmdk-monolithic-sparse.vmdk", true),
                      ("vdi-static.vdi", false), ("vpc-dynamic.vhd", false)])
    func whatIsStoredVerbatimIsShared(_ name: String, clones: Bool) throws {
        let dir = try reflinkTemp()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = dir + "/" + name
        try FileManager.default.copyItem(atPath: samplesDir + "/" + name, toPath: src)
        let image = try ImageOpener.open(path: src)
        let dst = dir + "/out.raw"
        let stats = try Converter().convert(image, to: RawFileSink(path: dst))
        let out = Array(FileManager.default.contents(atPath: dst)!)
        let base = Array(FileManager.default.contents(atPath: samplesDir + "/base.raw")!)
        #expect(out.count == Int(image.virtualSize))
        #expect(Array(out[0..<base.count]) == base)
        #expect(out[base.count...].allSatisfy { $0 == 0 })
        let extents = try image.allExtents().filter { $0.status == .data }
        let verbatim = extents.filter { !$0.compressed }.reduce(UInt64(0)) { $0 + $1.length }
        // Only bytes stored as they are can be shared, and the kernel sees each of them shared.
        #expect(stats.bytesCloned <= verbatim)
        #expect(try sharedBytes(dst) == stats.bytesCloned)
        if clones {
            #expect(stats.bytesCloned > 0)
            if verbatim < extents.reduce(0, { $0 + $1.length }) {
                #expect(stats.bytesRead > 0, "the compressed clusters were read")
            }
        } else {
            #expect(stats.bytesCloned == 0)
        }
        let names = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        #expect(names == [name, "out.raw"].sorted(), "\(names)")
    }

    /// A data pointer past the end of the file: the clone is refused (EINVAL), the window is read, and the read
    /// fails as it does anywhere; nothing is left behind.
    @Test(.enabled(if: reflinkDir != nil, "no reflink file system (IMGCONV_REFLINK_DIR)"))
    func aPointerPastTheEndFailsAsWhenRead() throws {
        var b = Array(FileManager.default.contents(atPath: samplesDir + "/qcow2-v3.qcow2")!)
        let l1 = Int(b[40..<48].reduce(0) { $0 << 8 | UInt64($1) })
        let l2 = Int(b[l1..<(l1 + 8)].reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00)
        for i in 0..<8 { b[l2 + i] = [0x80, 0, 0, 0x10, 0, 0, 0, 0][i] }  // the first cluster, at 1 TiB
        let dir = try reflinkTemp()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        FileManager.default.createFile(atPath: dir + "/bad.qcow2", contents: Data(b))
        let image = try ImageOpener.open(path: dir + "/bad.qcow2")
        #expect(throws: ImageError.self) { try Converter().convert(image, to: RawFileSink(path: dir + "/out.raw")) }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["bad.qcow2"])
    }

    /// With -C every uncompressed format places its data on 4 KiB (VHD's bitmap takes the sector before each block, VDI's
    /// data area starts on 4 KiB) and clones into it: clean check, same content, shared blocks. A 512-byte-cluster
    /// qcow2 and compressed output are never asked.
    @Test(.enabled(if: reflinkDir != nil, "no reflink file system (IMGCONV_REFLINK_DIR)"),
          arguments: [(ImageFormat.qcow2, [String: String]()), (.vpc, [:]), (.vpc, ["subformat": "fixed"]),
                      (.vdi, [:]), (.vdi, ["static": "on"])])
    func everyFormatClonesIntoItsBlocks(_ format: ImageFormat, _ options: [String: String]) throws {
        let dir = try reflinkTemp()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for name in ["base.raw", "qcow2-v3.qcow2", "qcow2-zlib.qcow2"] {
            try FileManager.default.copyItem(atPath: samplesDir + "/" + name, toPath: dir + "/" + name)
            let image = try ImageOpener.open(path: dir + "/" + name)
            let out = dir + "/" + name + ".out"
            var spec = OutputSpec(format: format)
            spec.options = options
            // Without -C an image format is written as always.
            let copied = try Converter().convert(image, to: try spec.makeSink(path: out + ".copied"))
            #expect(copied.bytesCloned == 0 && copied.bytesWritten > 0, "\(name)")
            #expect(try sharedBytes(out + ".copied") == 0, "\(name)")
            spec.copyOffload = true
            let stats = try Converter().convert(image, to: try spec.makeSink(path: out))
            #expect(stats.bytesCloned > 0, "\(name)")
            #expect(try sharedBytes(out) >= stats.bytesCloned, "\(name)")
            let made = try ImageOpener.open(path: out, declared: format)
            let check = try made.check()
            #expect(check.corruptions == 0 && check.leaks == 0, "\(name): \(check.messages)")
            var a = [UInt8](repeating: 0, count: Int(image.virtualSize)), b = a
            try a.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
            try b.withUnsafeMutableBytes { try made.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<min($0.count, Int(made.virtualSize))]), at: 0) }
            #expect(a == b, "\(name)")
        }
        let source = try FileStorage(path: dir + "/base.raw")
        var small = QCOW2Sink.Options()
        small.copyOffload = true
        small.clusterBits = 9
        let tiny = try QCOW2Sink(path: dir + "/tiny.qcow2", options: small)
        try tiny.begin(virtualSize: 1 << 20)
        #expect(tiny.cloneAlignment(from: source) == nil)
        tiny.abort()
        var compressed = QCOW2Sink.Options()
        compressed.copyOffload = true
        compressed.compression = .zlib
        let zipped = try QCOW2Sink(path: dir + "/zipped.qcow2", options: compressed)
        try zipped.begin(virtualSize: 1 << 20)
        #expect(zipped.cloneAlignment(from: source) == nil)
        zipped.abort()
    }

    /// A clone the file system refuses after the qcow2 sink allocated its clusters: the copy that follows is
    /// written into those clusters, so nothing leaks (ext4 refuses every clone).
    @Test func aRefusedQCOW2CloneLeaksNothing() throws {
        let src = tempPath("src.raw")
        let bytes = (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        FileManager.default.createFile(atPath: src, contents: Data(bytes))
        let storage = try FileStorage(path: src)
        let out = tempPath("refused.qcow2")
        let sink = try QCOW2Sink(path: out)
        try sink.begin(virtualSize: UInt64(bytes.count))
        if FileClone.mayShareExtents(sink.file.fd) { sink.abort(); return }  // a sharing file system: nothing to refuse
        #expect {
            try sink.clone(from: storage, at: 0, length: UInt64(bytes.count), to: 0)
        } throws: { ($0 as? FileError).map { FileClone.isRefusal($0.errno) } ?? false }
        try bytes.withUnsafeBytes { try sink.write(sink.encode($0, at: 0)) }
        try sink.drain()
        try sink.finish()
        let made = try ImageOpener.open(path: out, declared: .qcow2)
        let check = try made.check()
        #expect(check.corruptions == 0 && check.leaks == 0, "\(check.messages)")
        var back = [UInt8](repeating: 0, count: bytes.count)
        try back.withUnsafeMutableBytes { try made.read(into: $0, at: 0) }
        #expect(back == bytes)
    }

    /// A file system that offers and then refuses (XFS without reflink): the windows planned as clones are read
    /// and written instead, the later ones are never planned, and the counters add up.
    @Test func aRefusedCloneIsCopied() throws {
        let image = try ImageOpener.open(path: samplesDir + "/qcow2-v3.qcow2")
        let dst = tempPath("refused.raw")
        let sink = RefusingCloneSink(path: dst)
        var options = ConvertOptions()
        options.chunkSize = 64 << 10  // many windows, so some are planned after the refusal
        options.workers = 1
        let stats = try Converter(options: options).convert(image, to: sink)
        let reference = try Converter().convert(image, to: RawFileSink(path: tempPath("reference.raw")))
        let out = Array(FileManager.default.contents(atPath: dst)!)
        let base = Array(FileManager.default.contents(atPath: samplesDir + "/base.raw")!)
        #expect(Array(out[0..<base.count]) == base)
        // Asked once: the windows planned as clones before the refusal are copied without asking again.
        #expect(sink.attempts == 1)
        #expect(stats.bytesCloned == 0)
        #expect(stats.bytesWritten == reference.bytesWritten)
        #expect(stats.zeroBytesSkipped + stats.bytesWritten == stats.bytesRead)
    }

    /// An existing target written in place (`-n`) keeps its own blocks; so does a preallocated one; and ext4 is
    /// never asked.
    @Test func onlyANewSparseFileOnASharingFileSystemClones() throws {
        let src = try FileStorage(path: samplesDir + "/qcow2-v3.qcow2")
        let local = RawFileSink(path: tempPath("local.raw"))
        try local.begin(virtualSize: 1 << 20)
        defer { local.abort() }
        if !FileClone.mayShareExtents(local.file.fd) {
            #expect(local.cloneAlignment(from: src) == nil)
        }
        guard let dir = reflinkDir else { return }
        let work = try reflinkTemp()
        defer { try? FileManager.default.removeItem(atPath: work) }
        try FileManager.default.copyItem(atPath: samplesDir + "/qcow2-v3.qcow2", toPath: work + "/in.qcow2")
        let there = try FileStorage(path: work + "/in.qcow2")
        let fresh = RawFileSink(path: work + "/fresh.raw")
        try fresh.begin(virtualSize: 1 << 20)
        #expect(fresh.cloneAlignment(from: there) == 4096)
        #expect(fresh.cloneAlignment(from: src) == nil, "a source on another file system (\(dir) is not /work)")
        fresh.abort()
        let pre = RawFileSink(path: work + "/pre.raw", preallocation: .falloc)
        try pre.begin(virtualSize: 1 << 20)
        #expect(pre.cloneAlignment(from: there) == nil)
        pre.abort()
        FileManager.default.createFile(atPath: work + "/existing.raw", contents: Data(count: 1 << 20))
        let inPlace = RawFileSink(path: work + "/existing.raw", inPlace: true)
        try inPlace.begin(virtualSize: 1 << 20)
        #expect(inPlace.cloneAlignment(from: there) == nil)
        inPlace.abort()
    }
}
