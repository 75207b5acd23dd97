import Foundation
import Testing
@testable import ImageFormats

/// Tables are sized by what the virtual size needs, never by the file; large ones are paged; the structural
/// check keeps its memory to one window of the file whatever the tables claim.
@Suite("table bounds")
struct BoundsTests {
    /// A storage that counts the bytes read from it.
    final class CountingStorage: ImageStorage, @unchecked Sendable {
        let inner: MemoryStorage
        var read = 0
        init(_ bytes: [UInt8]) { inner = MemoryStorage(bytes) }
        var name: String { "counting" }
        var size: UInt64 { inner.size }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
            read += buffer.count
            try inner.read(into: buffer, at: offset, what: what)
        }
    }

    @Test func pagedTableMatchesTheEntries() throws {
        // 3 Mi big-endian 32-bit entries (12 MiB, over the 8 MiB resident limit): read in pages, on demand.
        let n = 3 << 20
        var bytes = [UInt8](repeating: 0, count: n * 4 + 512)
        var entries = [UInt32](repeating: 0xffff_ffff, count: n)
        for i in stride(from: 7, to: n, by: 100_003) { entries[i] = UInt32(i) }
        entries[n - 1] = 42
        for (i, e) in entries.enumerated() { bytes.putBE32(512 + i * 4, e) }
        let storage = CountingStorage(bytes)
        let table = try OnDiskTable<UInt32>(storage: storage, offset: 512, count: n, bigEndian: true, what: "test table")
        #expect(storage.read == 0, "a paged table reads nothing until asked")
        #expect(try table[7] == 7 && table[8] == 0xffff_ffff && table[n - 1] == 42)
        #expect(storage.read <= 2 * (64 << 10))
        var seen: [Int] = []
        try table.forEach(notEqualTo: 0xffff_ffff) { i, e in
            #expect(UInt32(i) == e || (i == n - 1 && e == 42))
            seen.append(i)
            return true
        }
        #expect(seen == entries.indices.filter { entries[$0] != 0xffff_ffff })
        #expect(try table.firstIndex(from: 8, to: n, notEqualTo: 0xffff_ffff) == 100_010)
        #expect(try table.firstIndex(from: 100_011, to: 200_000, notEqualTo: 0xffff_ffff) == nil)
        // A small table is read once, whole.
        let small = try OnDiskTable<UInt32>(storage: storage, offset: 512, count: 1000, bigEndian: true, what: "small")
        #expect(try small[7] == 7)
    }

    @Test func vhdBATLargerThanTheDiskIsRefused() throws {
        var b = Samples.bytes("vpc-dynamic.vhd")
        // max_table_entries in the dynamic header (at 512 + 28): one more block than 2 MiB needs at 2 MiB blocks
        // is allowed only up to what current_size needs.
        let entries = b.be32(512 + 28)
        b.putBE32(512 + 28, entries + 1000)
        #expect(imageError { _ = try openMemory(b, .vpc) }.map { "\($0)".contains("larger than a disk") } == true)
    }

    @Test func vdiBlockMapLargerThanTheDiskIsRefused() throws {
        var b = Samples.bytes("vdi-dynamic.vdi")
        b.putLE32(384, b.le32(384) + 1)
        #expect(imageError { _ = try openMemory(b, .vdi) }.map { "\($0)".contains("larger than a disk") } == true)
    }

    @Test func vmdkGrainDirectoryIsBounded() throws {
        var b = Samples.bytes("vmdk-monolithic-sparse.vmdk")
        // 1-sector grains, 1 entry per table: 64 Ti entries would be needed for 32 TiB.
        b.putLE64(12, (32 << 40) / 512)
        b.putLE64(20, 1)
        b.putLE32(44, 1)
        guard case .limitExceeded(_, let field, _, _)? = imageError({ _ = try openMemory(b, .vmdk) }) else {
            Issue.record("expected a limit"); return
        }
        #expect(field == "grain directory entries")
    }

    @Test func windowedRangeCheckFindsWhatOneWindowFinds() throws {
        // Ranges spread over a 1 MiB "file", with overlaps in several windows and one past the end.
        let ranges: [(UInt64, UInt64)] = [(0, 512), (4096, 8192), (8192, 512), (300_000, 70_000), (360_000, 1024),
                                          (900_000, 4096), (1_048_000, 1000), (700_000, 512), (700_100, 100)]
        func check(window: Int) throws -> CheckResult {
            var r = CheckResult(filename: "x", format: .raw)
            try HostRangeChecker.run(fileSize: 1 << 20, into: &r, windowBytes: window) { c in
                for (i, (o, l)) in ranges.enumerated() { try c.add("range", i, offset: o, length: l) }
            }
            return r
        }
        let whole = try check(window: 8 << 20), small = try check(window: 16)
        #expect(whole.corruptions == 4, "\(whole.messages)")
        #expect(small.corruptions == whole.corruptions)
        #expect(Set(small.messages) == Set(whole.messages))
        #expect(whole.messages.contains("ERROR range 3 at offset 300000 overlaps range 4") == false)
        #expect(whole.messages.contains("ERROR range 4 at offset 360000 overlaps range 3"))
        #expect(whole.messages.contains("ERROR range 2 at offset 8192 overlaps range 1"))
        #expect(whole.messages.contains("ERROR range 8 at offset 700100 overlaps range 7"))
        #expect(whole.messages.contains { $0.contains("range 6 at offset 1048000 (length 1000) lies past the end") })
    }

    @Test func rangeCheckStopsAfterTooManyErrors() throws {
        var r = CheckResult(filename: "x", format: .raw)
        var added = 0
        try HostRangeChecker.run(fileSize: 1 << 20, into: &r) { c in
            for i in 0..<1_000_000 {
                added += 1
                try c.add("block", i, offset: 0, length: 512)
            }
        }
        #expect(r.corruptions == HostRangeChecker.maxErrors)
        #expect(r.checkErrors == 1)
        #expect(r.messages.last?.contains("stopped after") == true)
        #expect(r.messages.first == "ERROR block 1 at offset 0 overlaps block 0")
        #expect(added < 3 * HostRangeChecker.maxErrors, "the walk stops, and the replay stops where it did")
    }
}
