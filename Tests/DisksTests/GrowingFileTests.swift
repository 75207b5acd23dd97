@testable import Disks
import Foundation
import Testing

/// The stream file the converter follows while the download fills it: a RAM window over a file written around
/// the page cache. No services needed.
@Suite("growing file")
struct GrowingFileTests {
    /// The test stream repeats a random pattern whose period divides neither the window nor a chunk, so a read
    /// from the wrong lap of the window or the wrong file offset shows.
    static let period = (5 << 20) + 7
    static let pattern: [UInt8] = {
        var rng = SplitMix(1)
        return (0..<period).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    }()

    static func byte(_ i: UInt64) -> UInt8 { pattern[Int(i % UInt64(period))] }

    /// Applies `body` to the pieces of `[offset, offset + count)` that are contiguous in the pattern.
    static func segments(_ offset: UInt64, _ count: Int, _ body: (_ at: Int, _ pattern: UnsafeRawBufferPointer) -> Void) {
        pattern.withUnsafeBytes { p in
            var at = 0
            while at < count {
                let start = Int((offset + UInt64(at)) % UInt64(period))
                let n = min(count - at, period - start)
                body(at, UnsafeRawBufferPointer(rebasing: p[start..<(start + n)]))
                at += n
            }
        }
    }

    static func fill(_ buffer: UnsafeMutableRawBufferPointer, from offset: UInt64) {
        segments(offset, buffer.count) { at, p in (buffer.baseAddress! + at).copyMemory(from: p.baseAddress!, byteCount: p.count) }
    }

    /// The first byte of `buffer` that is not the stream's byte at `offset`, if any.
    static func firstDifference(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Int? {
        var first: Int?
        segments(offset, buffer.count) { at, p in
            guard first == nil, memcmp(buffer.baseAddress! + at, p.baseAddress!, p.count) != 0 else { return }
            first = at + (0..<p.count).first { buffer[at + $0] != p[$0] }!
        }
        return first
    }

    /// Writes `size` bytes in irregular blocks (some larger than a chunk, none aligned) on another thread.
    static func writeAll(_ file: GrowingFile, size: UInt64, seed: UInt64) -> Thread {
        let t = Thread {
            var rng = SplitMix(seed)
            var at: UInt64 = 0
            var failure: String?
            let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 9 << 20, alignment: 1)
            defer { block.deallocate() }
            while at < size {
                let n = Int(min(size - at, UInt64(1 + rng.next() % (rng.next() % 4 == 0 ? 9 << 20 : 300_000))))
                let b = UnsafeMutableRawBufferPointer(rebasing: block[..<n])
                fill(b, from: at)
                do { try file.write(UnsafeRawBufferPointer(b), at: at) } catch { failure = "\(error)"; break }
                at += UInt64(n)
            }
            try? file.finish(failure: failure)
        }
        t.start()
        return t
    }

    /// A stream file of `size` bytes in a new temporary directory, closed and removed after `body`.
    func withFile(size: UInt64, _ body: (GrowingFile) throws -> Void) throws {
        let dir = try temporaryDirectory("growing")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = try GrowingFile(path: "\(dir)/stream", size: size)
        defer { file.close() }
        try body(file)
    }

    func check(directory: String) throws {
        let size: UInt64 = 83 << 20 + 4093
        let file = try GrowingFile(path: "\(directory)/stream", size: size)
        defer { file.close() }
        let writer = Self.writeAll(file, size: size, seed: 7)
        // The converter's pattern: mostly forward, now and then far back (behind the window) or just ahead.
        var rng = SplitMix(11)
        var position: UInt64 = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 1)
        defer { buffer.deallocate() }
        var reads = 0
        while position < size {
            let n = Int(min(size - position, UInt64(1 + rng.next() % (1 << 20))))
            var at = position
            switch rng.next() % 10 {
            case 0: at = rng.next() % max(1, position)                      // anywhere behind, often below the window
            case 1: at = min(size - UInt64(n), position + rng.next() % (8 << 20))  // ahead of the reads: waits
            default: position += UInt64(n)
            }
            let b = UnsafeMutableRawBufferPointer(rebasing: buffer[..<n])
            try file.read(into: b, at: at, what: "test")
            if let k = Self.firstDifference(UnsafeRawBufferPointer(b), at: at) {
                Issue.record("byte \(at + UInt64(k)) read as \(b[k]), want \(Self.byte(at + UInt64(k)))")
                return
            }
            reads += 1
        }
        while !writer.isFinished { usleep(1000) }
        #expect(reads > 100)
        // The file itself: exactly the stream, its unaligned tail included, and no padding left.
        let data = try #require(FileManager.default.contents(atPath: file.path))
        #expect(UInt64(data.count) == size)
        let bad = data.withUnsafeBytes { Self.firstDifference($0, at: 0) }
        #expect(bad == nil, "file differs at byte \(bad ?? 0)")
    }

    @Test("reads in the window, behind it and ahead of the download all return the stream's bytes; the file is the stream")
    func readsAndFile() throws {
        let dir = try temporaryDirectory("growing")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try check(directory: dir)
    }

    @Test("on tmpfs (no O_DIRECT on older kernels) the same holds through the page cache")
    func tmpfs() throws {
        guard access("/dev/shm", W_OK) == 0 else { return }
        let dir = "/dev/shm/imgconv-growing-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try check(directory: dir)
    }

    @Test("the download waits while it is far ahead of the reads, and runs free once the converter stops following")
    func backpressure() throws {
        let size: UInt64 = 96 << 20
        try withFile(size: size) { file in
            let writer = Self.writeAll(file, size: size, seed: 3)
            var one = [UInt8](repeating: 0, count: 1)
            try one.withUnsafeMutableBytes { try file.read(into: $0, at: 0, what: "test") }
            usleep(300_000)
            let held = file.received
            #expect(held <= file.lead + (9 << 20), "the download ran \(held) bytes ahead of a reader at byte 1")
            #expect(held >= file.lead, "the download stopped at \(held), before the lead")
            file.stopFollowing()
            while !writer.isFinished { usleep(1000) }
            #expect(file.received == size)
            // Early bytes are below the window now: they come from the file.
            try one.withUnsafeMutableBytes { try file.read(into: $0, at: 5, what: "test") }
            #expect(one[0] == Self.byte(5))
        }
    }

    @Test("a failed download fails the reads waiting for its bytes, with the reason")
    func failure() throws {
        try withFile(size: 1 << 20) { file in
            let t = Thread {
                usleep(50_000)
                try? file.finish(failure: "checksum mismatch")
            }
            t.start()
            var b = [UInt8](repeating: 0, count: 10)
            #expect(throws: DiskError.self) { try b.withUnsafeMutableBytes { try file.read(into: $0, at: 100, what: "test") } }
            do { try b.withUnsafeMutableBytes { try file.read(into: $0, at: 100, what: "test") } } catch {
                #expect("\(error)".contains("checksum mismatch"))
            }
        }
    }

    @Test("blocks out of order are refused, not stored at the wrong place")
    func outOfOrder() throws {
        try withFile(size: 1 << 20) { file in
            let b = [UInt8](repeating: 1, count: 10)
            #expect(throws: DiskError.self) { try b.withUnsafeBytes { try file.write($0, at: 4096) } }
        }
    }
}

struct SplitMix {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
