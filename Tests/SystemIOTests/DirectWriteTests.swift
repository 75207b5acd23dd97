import Foundation
import SystemIO
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// O_DIRECT output: the bytes land exactly where buffered writes would put them, whatever the alignment of the
/// offsets, lengths and buffers; large aligned pieces bypass the page cache; a file system that refuses O_DIRECT
/// (tmpfs) gets buffered writes and says why.
@Suite("direct writes")
struct DirectWriteTests {
    /// The writes of a sink, as (offset, length, buffer misalignment, submitted rather than written).
    static let pattern: [(UInt64, Int, Int, Bool)] = [
        (0, 512, 0, false),                          // a header: small, buffered
        (1 << 20, 4 << 20, 0, true),                  // aligned, several pieces in flight
        (6 << 20 + 512, 3 << 20, 0, true),            // unaligned offset: a buffered head and tail around it
        (10 << 20, 2 << 20, 1, true),                 // a misaligned buffer: through the bounce buffer
        (13 << 20 + 100, 70_000, 0, false),           // too small an aligned middle: buffered
        (16 << 20, 8 << 20, 0, true),                 // the range mincore checks below
        (5 << 20, 4096, 0, false),                    // a small write between direct ones
    ]

    /// Writes `pattern` into a new OutputFile in `dir` with `direct`; returns the file, committed, and what it
    /// must hold.
    static func write(in dir: String, direct: Bool) throws -> (OutputFile, [UInt8]) {
        let size = 25 << 20
        var model = [UInt8](repeating: 0, count: size)
        let file = OutputFile(path: dir + "/out.raw")
        file.direct = direct
        try file.create()
        try file.truncate(UInt64(size))
        // Every buffer outlives the writes in flight: freed after the final drain.
        var buffers: [UnsafeMutableRawBufferPointer] = []
        defer { buffers.forEach { $0.deallocate() } }
        for (i, (offset, length, misalign, submitted)) in pattern.enumerated() {
            let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: length + misalign, alignment: 4096)
            buffers.append(raw)
            let buf = UnsafeMutableRawBufferPointer(rebasing: raw[misalign...])
            for j in 0..<length { buf[j] = UInt8(truncatingIfNeeded: j &* 31 &+ i &* 7 &+ 1) }
            for j in 0..<length { model[Int(offset) + j] = buf[j] }
            if submitted {
                try file.submit(UnsafeRawBufferPointer(buf), at: offset)
            } else {
                try file.pwriteAll(UnsafeRawBufferPointer(buf), at: offset)
            }
        }
        try file.drain()
        try file.commit()
        return (file, model)
    }

    /// Pages of `path` in the page cache, in `range` (mincore).
    static func residentPages(_ path: String, _ range: Range<Int>) -> Int {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard let map = mmap(nil, range.count, PROT_READ, MAP_SHARED, fd, off_t(range.lowerBound)),
              map != MAP_FAILED else { return -1 }
        defer { munmap(map, range.count) }
        var vec = [UInt8](repeating: 0, count: range.count / page)
        guard mincore(map, range.count, &vec) == 0 else { return -1 }
        return vec.reduce(0) { $0 + Int($1 & 1) }
    }

    func contents(_ path: String) -> [UInt8] { [UInt8](FileManager.default.contents(atPath: path) ?? Data()) }

    /// The file system's type as stat -f names it ("ext2/ext3" for ext4, "xfs", "tmpfs").
    static func fileSystemType(_ path: String) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/stat")
        p.arguments = ["-f", "-c", "%T", path]
        let out = Pipe()
        p.standardOutput = out
        guard (try? p.run()) != nil else { return "" }
        p.waitUntilExit()
        return String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func directWritesLandWhereBufferedOnesWouldAndSkipThePageCache() throws {
        let dir = NSTemporaryDirectory() + "imgconv-direct-\(UUID().uuidString.prefix(8))"
        try FileSystem.makeDirectory(dir, mode: 0o755)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The test machine's /tmp is ext4 or xfs: both take O_DIRECT; a test that ran buffered there would prove
        // nothing.
        let type = Self.fileSystemType(dir)
        try #require(type == "ext2/ext3" || type == "xfs", "need ext4 or xfs for \(dir), found \(type)")
        let (file, model) = try Self.write(in: dir, direct: true)
        #expect(file.directRefusal == nil)
        let path = dir + "/out.raw"
        // 8 MiB written direct at 16 MiB: none of it went through the page cache (a buffered write leaves every
        // page resident until write-back and reclaim).
        let resident = Self.residentPages(path, (16 << 20)..<(24 << 20))
        #expect(resident >= 0 && resident < 16, "\(resident) of 2048 pages of a direct write are in the page cache")
        #expect(contents(path) == model)

        // The same writes buffered: the same bytes, and the pages are resident.
        try FileSystem.remove(path)
        let (_, model2) = try Self.write(in: dir, direct: false)
        #expect(Self.residentPages(path, (16 << 20)..<(24 << 20)) > 1024)
        #expect(contents(path) == model2)
        #expect(model == model2)
    }

    /// ramfs refuses O_DIRECT at open (EINVAL), as some network file systems do; tmpfs takes it since Linux 6.6.
    /// Mounting ramfs needs root, which the test machine has.
    @Test func aFileSystemThatRefusesDirectIOGetsBufferedWrites() throws {
        let dir = NSTemporaryDirectory() + "imgconv-ramfs-\(UUID().uuidString.prefix(8))"
        try FileSystem.makeDirectory(dir, mode: 0o755)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try #require(mount("none", dir, "ramfs", 0, nil) == 0, "mount -t ramfs: \(errnoName(errno)) (the test needs root)")
        defer { umount(dir) }
        let (file, model) = try Self.write(in: dir, direct: true)
        #expect(file.directRefusal == "O_DIRECT refused at open: EINVAL")
        #expect(contents(dir + "/out.raw") == model)
    }

    @Test func onTmpfsTheBytesAreRightEitherWay() throws {
        let dir = "/dev/shm/imgconv-direct-\(UUID().uuidString.prefix(8))"
        try #require(Self.fileSystemType("/dev/shm") == "tmpfs")
        try FileSystem.makeDirectory(dir, mode: 0o755)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (_, model) = try Self.write(in: dir, direct: true)
        #expect(contents(dir + "/out.raw") == model)
    }

    /// A failure of a write in flight comes back from `drain` (and `commit`), and nothing is published.
    @Test func aFailedDirectWriteIsReportedAndNothingIsPublished() throws {
        let dir = NSTemporaryDirectory() + "imgconv-direct-\(UUID().uuidString.prefix(8))"
        try FileSystem.makeDirectory(dir, mode: 0o755)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = OutputFile(path: dir + "/out.raw")
        file.direct = true
        try file.create()
        try #require(file.isDirect)
        // Past the largest offset ext4 takes (16 TiB with 4 KiB blocks): the write fails with EFBIG or EINVAL.
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 1)
        do {
            try file.submit(UnsafeRawBufferPointer(buf), at: 1 << 50)
            try file.drain()
            Issue.record("a write at 1 PiB succeeded")
        } catch let e as FileError {
            #expect(e.errno == EFBIG || e.errno == EINVAL, "\(e)")
        }
        file.discard()
        #expect(FileSystem.list(dir).isEmpty)
    }
}
