import Synchronization
import Foundation
import Testing
@testable import Convert
import ImageFormats

let samplesDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("samples").path

/// Records what a converter writes.
final class RecordingSink: ImageSink {
    var writes: [(UInt64, [UInt8])] = []
    var began: UInt64?
    var finished = false
    var aborted = false
    var failAfter: Int?
    let unit: Int

    init(unit: Int = 4096) { self.unit = unit }

    func begin(virtualSize: UInt64) throws { began = virtualSize }
    func write(_ run: EncodedRun) throws {
        if let n = failAfter, writes.count >= n { throw SinkError.io(operation: "write", path: "test", errno: ENOSPC) }
        writes.append((run.offset, Array(run.data)))
    }
    func finish() throws { finished = true }
    func abort() { aborted = true }
}

/// An image made of one data extent with chosen bytes.
final class BytesImage: DiskImage {
    let format = ImageFormat.raw
    let files: [any ImageStorage]
    var virtualSize: UInt64 { files[0].size }
    init(_ bytes: [UInt8]) { files = [MemoryStorage(bytes)] }
    func segment(at offset: UInt64, until end: UInt64) throws -> Segment {
        Segment(start: 0, length: virtualSize, mapping: .data(file: 0, host: 0))
    }
    func info() -> ImageInfo { ImageInfo(filename: "bytes", format: .raw, virtualSize: virtualSize) }
    func check() throws -> CheckResult { CheckResult(filename: "bytes", format: .raw) }
}

func tempPath(_ name: String) -> String {
    let dir = NSTemporaryDirectory() + "imgconv-convert-\(UUID().uuidString.prefix(8))"
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir + "/" + name
}

@Suite("converter")
struct ConvertTests {
    @Test func zeroRunsInsideDataAreNotWritten() throws {
        var bytes = [UInt8](repeating: 0, count: 64 * 1024)
        for i in 0..<100 { bytes[i] = 1 }            // granule 0
        for i in 20000..<20010 { bytes[i] = 2 }      // granule 4
        for i in 61440..<65536 { bytes[i] = 3 }      // granule 15
        let sink = RecordingSink()
        let stats = try Converter().convert(BytesImage(bytes), to: sink)
        #expect(sink.writes.map(\.0) == [0, 16384, 61440])
        #expect(sink.writes.map(\.1.count) == [4096, 4096, 4096])
        #expect(stats.bytesWritten == 3 * 4096)
        #expect(stats.zeroBytesSkipped == 13 * 4096)
        #expect(sink.finished && !sink.aborted)
    }

    @Test func unitIsTheSinksAllocationUnit() throws {
        // A 64 KiB unit (a qcow2 cluster) is written whole when any byte of it is data.
        var bytes = [UInt8](repeating: 0, count: 256 * 1024)
        bytes[70000] = 9
        let sink = RecordingSink(unit: 65536)
        try Converter().convert(BytesImage(bytes), to: sink)
        #expect(sink.writes.map(\.0) == [65536])
        #expect(sink.writes.map(\.1.count) == [65536])
    }

    @Test func optionsAreValidated() {
        var o = ConvertOptions()
        o.workers = 0
        #expect(throws: SinkError.self) { try Converter(options: o) }
        o.workers = 2
        o.chunkSize = 1
        #expect(throws: SinkError.self) { try Converter(options: o) }
        var spec = OutputSpec(format: .raw)
        spec.zeroGranularity = 1000
        #expect(throws: SinkError.self) { try spec.makeSink(path: "/tmp/x") }
        spec = OutputSpec(format: .qcow2)
        spec.options = ["cluster_size": "3000"]
        #expect(throws: SinkError.invalidOption("cluster_size=3000 (a power of two from 512 to 2M)")) { try spec.makeSink(path: "/tmp/x") }
        spec.options = ["bogus": "1"]
        #expect(throws: SinkError.invalidOption("'bogus' is not an option of the qcow2 output")) { try spec.makeSink(path: "/tmp/x") }
        spec = OutputSpec(format: .vpc)
        spec.compress = true
        #expect(throws: SinkError.self) { try spec.makeSink(path: "/tmp/x") }
    }

    @Test func errorsAbortTheSink() throws {
        let sink = RecordingSink()
        sink.failAfter = 1
        var bytes = [UInt8](repeating: 1, count: 3 << 20)
        bytes[1 << 20] = 0
        #expect(throws: SinkError.self) { try Converter().convert(BytesImage(bytes), to: sink) }
        #expect(sink.aborted && !sink.finished)
    }

    @Test(arguments: ["qcow2-zlib.qcow2", "qcow2-extl2.qcow2", "vmdk-stream-optimized.vmdk", "vpc-dynamic.vhd", "vdi-static.vdi"])
    func rawFileIsSparseAndExact(_ name: String) throws {
        let image = try ImageOpener.open(path: samplesDir + "/" + name)
        let dst = tempPath("out.raw")
        let stats = try Converter().convert(image, to: RawFileSink(path: dst))
        let out = Array(FileManager.default.contents(atPath: dst)!)
        let base = Array(FileManager.default.contents(atPath: samplesDir + "/base.raw")!)
        #expect(out.count == Int(image.virtualSize))
        #expect(Array(out[0..<base.count]) == base)
        #expect(stats.bytesWritten < UInt64(base.count))
        // The file holds only what was written.
        let allocated = try FileStorage(path: dst).allocatedBytes!
        #expect(allocated <= stats.bytesWritten + 64 * 1024)
        let names = try FileManager.default.contentsOfDirectory(atPath: (dst as NSString).deletingLastPathComponent)
        #expect(names == ["out.raw"])
    }

    /// `-n` writes the existing file; an abort closes it once and leaves it where it is. (It used to close the
    /// descriptor and keep its number, which the sink's deinit then closed again: by then it could be a file
    /// another thread had opened.)
    @Test func inPlaceAbortClosesTheFileOnce() throws {
        let dst = tempPath("existing.raw")
        #expect(FileManager.default.createFile(atPath: dst, contents: Data(count: 1 << 20)))
        let sink = RawFileSink(path: dst, inPlace: true)
        try sink.begin(virtualSize: 1 << 20)
        let fd = try #require(sink.outputFile?.fd)
        #expect(fd >= 0 && fcntl(fd, F_GETFD) != -1)
        sink.abort()
        #expect(sink.outputFile?.fd == -1)
        sink.abort()
        #expect(FileManager.default.fileExists(atPath: dst))
    }

    /// A read error in one batch while the writer still stores the previous one: the converter waits for the
    /// writer before it returns, so the sink is aborted after its last write and nothing writes into it (or
    /// reads the freed buffers) afterwards.
    @Test func anErrorWaitsForTheWriterBeforeTheSinkIsAborted() throws {
        final class FailingStorage: ImageStorage, @unchecked Sendable {
            let name = "failing", size: UInt64 = 8 << 20
            func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
                if offset >= 4 << 20 { throw ImageError.io(operation: "read", path: name, errno: EIO) }
                for i in buffer.indices { buffer[i] = 1 }
            }
            func allocation(at offset: UInt64) throws -> (isData: Bool, end: UInt64) { (true, size) }
            var allocatedBytes: UInt64? { nil }
        }
        final class FailingImage: DiskImage {
            let format = ImageFormat.raw
            let files: [any ImageStorage] = [FailingStorage()]
            var virtualSize: UInt64 { 8 << 20 }
            func segment(at offset: UInt64, until end: UInt64) throws -> Segment {
                Segment(start: 0, length: virtualSize, mapping: .data(file: 0, host: 0))
            }
            func info() -> ImageInfo { ImageInfo(filename: "failing", format: .raw, virtualSize: virtualSize) }
            func check() throws -> CheckResult { CheckResult(filename: "failing", format: .raw) }
        }
        final class SlowSink: ImageSink, @unchecked Sendable {
            let unit = 4096
            let events = Mutex<[String]>([])
            func begin(virtualSize: UInt64) throws {}
            func write(_ run: EncodedRun) throws {
                usleep(100_000)
                events.withLock { $0.append("write") }
            }
            func finish() throws { events.withLock { $0.append("finish") } }
            func abort() { events.withLock { $0.append("abort") } }
        }
        var options = ConvertOptions()
        options.workers = 1
        let sink = SlowSink()
        #expect(throws: ImageError.self) { try Converter(options: options).convert(FailingImage(), to: sink) }
        let atReturn = sink.events.withLock { $0 }
        usleep(500_000)
        let later = sink.events.withLock { $0 }
        #expect(atReturn.last == "abort", "\(atReturn)")
        #expect(later == atReturn, "the writer went on after the converter returned: \(later)")
        // The first batch was stored before the second was handed over; the second stops at its next window.
        #expect((2...3).contains(later.filter { $0 == "write" }.count), "\(later)")
    }

    @Test func cancellationLeavesNothingBehind() throws {
        let image = try ImageOpener.open(path: samplesDir + "/qcow2-v3.qcow2")
        let dst = tempPath("cancelled.raw")
        let converter = try Converter(cancel: { true })
        #expect(throws: SinkError.self) { try converter.convert(image, to: RawFileSink(path: dst)) }
        let dir = (dst as NSString).deletingLastPathComponent
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
    }

    @Test func corruptSourceLeavesNothingBehind() throws {
        var b = Array(FileManager.default.contents(atPath: samplesDir + "/qcow2-v3.qcow2")!)
        // The second L2 entry points past the end of the file: the first cluster converts, then the read fails.
        let l1 = Int(b[40..<48].reduce(0) { $0 << 8 | UInt64($1) })
        let l2 = Int(b[l1..<(l1 + 8)].reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00)
        for i in 0..<8 { b[l2 + 8 + i] = [0x80, 0, 0, 0x10, 0, 0, 0, 0][i] }
        let image = try ImageOpener.open(storage: MemoryStorage(b))
        let dst = tempPath("corrupt.raw")
        #expect(throws: ImageError.self) { try Converter().convert(image, to: RawFileSink(path: dst)) }
        let dir = (dst as NSString).deletingLastPathComponent
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
    }

    @Test func holesAreNeverRead() throws {
        let image = try ImageOpener.open(path: samplesDir + "/qcow2-v3.qcow2")
        let extents = try image.allExtents().filter { $0.status == .data }
        let data = extents.reduce(UInt64(0)) { $0 + $1.length }
        let stats = try Converter().convert(image, to: RecordingSink())
        // Windows may swallow holes shorter than 64 KiB (read as zeros, no I/O), never longer ones.
        #expect(stats.bytesRead >= data)
        #expect(stats.bytesRead <= data + UInt64(extents.count) * 2 * 65536)
        #expect(stats.holeBytes + stats.bytesRead == image.virtualSize)
    }

    @Test func zeroDetector() {
        for n in [0, 1, 7, 8, 31, 32, 33, 4096, 4097] {
            let z = [UInt8](repeating: 0, count: n + 3)
            z.withUnsafeBytes { b in
                for shift in 0..<3 {
                    #expect(ZeroDetector.isZero(UnsafeRawBufferPointer(rebasing: b[shift..<(shift + n)])))
                }
            }
            if n > 0 {
                for pos in [0, n / 2, n - 1] {
                    var nz = [UInt8](repeating: 0, count: n)
                    nz[pos] = 1
                    #expect(!nz.withUnsafeBytes { ZeroDetector.isZero($0) })
                }
            }
        }
    }
}
