#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

let hostIsBigEndian = 1.bigEndian == 1

/// A page of zero bytes and a page of 0xff bytes, to skip runs of empty table entries with memcmp.
struct TablePatterns: @unchecked Sendable {
    let bytes = 4096
    let zeros: UnsafeRawPointer
    let ones: UnsafeRawPointer
    init() {
        let z = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 16)
        z.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let o = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 16)
        o.initializeMemory(as: UInt8.self, repeating: 0xff, count: bytes)
        zeros = UnsafeRawPointer(z)
        ones = UnsafeRawPointer(o)
    }
}
let tablePatterns = TablePatterns()

/// A table of fixed-width integers stored in the image: the qcow2 L1 table, the VMDK grain directory, the VHD
/// block allocation table, the VDI block map.
///
/// Its length comes from what the virtual size needs, never from the file. A table of up to `residentLimit`
/// bytes is read once into memory (every real image of up to tens of TiB); a larger one is read in pages through a
/// bounded cache, so memory stays flat whatever a header claims: a forged 4 GiB file can describe a 4 GiB table,
/// and reading it twice into memory (raw bytes, then decoded) used to cost 8 GiB.
public final class OnDiskTable<Entry: FixedWidthInteger & UnsignedInteger & Sendable>: Sendable {
    public let count: Int
    let storage: any ImageStorage
    let offset: UInt64
    let bigEndian: Bool
    let what: String
    private let resident: [Entry]?
    private let pages: TableCache<[Entry]>?

    /// Tables up to this size are kept whole: 8 MiB holds the L1 table of a 64 TiB qcow2 (64 KiB clusters), the
    /// BAT of a 2 TiB VHD (2 MiB blocks) and the grain directory of a 64 TiB VMDK (64 KiB grains) eight times over.
    public static var residentLimit: Int { 8 << 20 }
    /// Entries per page of a paged table (64 KiB of bytes).
    static var pageEntries: Int { (64 << 10) / MemoryLayout<Entry>.size }
    /// What the pages of one paged table may hold in memory.
    static var pageCacheBytes: Int { 2 << 20 }

    /// The caller has checked `offset ..< offset + count * width` against the file (`checkRange`).
    init(storage: any ImageStorage, offset: UInt64, count: Int, bigEndian: Bool, what: String) throws {
        self.storage = storage
        self.offset = offset
        self.count = count
        self.bigEndian = bigEndian
        self.what = what
        let bytes = count * MemoryLayout<Entry>.size
        try storage.checkRange(offset: offset, length: UInt64(bytes), what: what)
        if bytes <= Self.residentLimit {
            resident = try Self.load(storage, at: offset, count: count, bigEndian: bigEndian, what: what)
            pages = nil
        } else {
            resident = nil
            pages = TableCache(capacityBytes: Self.pageCacheBytes, tableBytes: Self.pageEntries * MemoryLayout<Entry>.size)
        }
    }

    /// Reads `count` entries straight into their array and fixes the byte order in place (one copy in memory).
    static func load(_ storage: any ImageStorage, at offset: UInt64, count: Int, bigEndian: Bool, what: String) throws -> [Entry] {
        try [Entry](unsafeUninitializedCapacity: count) { buf, n in
            try storage.read(into: UnsafeMutableRawBufferPointer(buf), at: offset, what: what)
            n = count
            // Nothing to do when the file's byte order is the host's (a loop of no-ops still costs in debug builds).
            guard bigEndian != hostIsBigEndian else { return }
            for i in 0..<count { buf[i] = buf[i].byteSwapped }
        }
    }

    /// Entry `i` (`0 <= i < count`).
    @inline(__always)
    public subscript(i: Int) -> Entry {
        get throws {
            if let resident { return resident[i] }
            return try page(i / Self.pageEntries)[i % Self.pageEntries]
        }
    }

    private func page(_ p: Int) throws -> [Entry] {
        try pages!.table(at: UInt64(p)) {
            let first = p * Self.pageEntries
            let n = min(Self.pageEntries, count - first)
            return try Self.load(storage, at: offset + UInt64(first * MemoryLayout<Entry>.size), count: n,
                                 bigEndian: bigEndian, what: what)
        }
    }

    /// The first index at or after `start` (before `end`) whose entry is not `value`: runs of unused entries are
    /// skipped a page at a time (a forged table of a billion empty entries costs seconds, not minutes).
    public func firstIndex(from start: Int, to end: Int, notEqualTo value: Entry) throws -> Int? {
        var i = start
        let stop = min(end, count)
        while i < stop {
            let p = i / Self.pageEntries
            let pageStart = p * Self.pageEntries
            let pageEnd = min(pageStart + Self.pageEntries, stop)
            let found = try withEntries(page: p) { entries in
                entries[..<(pageEnd - pageStart + entries.startIndex)].withUnsafeBufferPointer {
                    Self.firstIndex(in: $0, from: i - pageStart, notEqualTo: value)
                }
            }
            if let found { return pageStart + found }
            i = pageEnd
        }
        return nil
    }

    /// The first index at or after `start` in `entries` whose entry is not `value`. Runs are compared with memcmp
    /// against a run of `value`, which is fast in any build (checks walk tables of millions of empty entries).
    public static func firstIndex(in entries: UnsafeBufferPointer<Entry>, from start: Int, notEqualTo value: Entry) -> Int? {
        var k = start
        let n = entries.count
        // Empty entries are all-zero or all-ones bytes: compare whole runs with a page of them.
        let page: UnsafeRawPointer? = value == 0 ? tablePatterns.zeros : (value == ~0 ? tablePatterns.ones : nil)
        let chunk = tablePatterns.bytes / MemoryLayout<Entry>.size
        while k < n {
            let m = min(chunk, n - k)
            if let page, m >= 16, memcmp(entries.baseAddress! + k, page, m * MemoryLayout<Entry>.size) == 0 {
                k += m
                continue
            }
            let e = k + m
            while k < e {
                if entries[k] != value { return k }
                k += 1
            }
        }
        return nil
    }

    /// Calls `body` with every entry in `start ..< end` that is not `value`, in order, a page at a time (the walks
    /// of a structural check: no per-entry lookup). `body` returns false to stop.
    public func forEach(from start: Int = 0, to end: Int? = nil, notEqualTo value: Entry,
                        _ body: (Int, Entry) throws -> Bool) throws {
        var i = start
        let stop = min(end ?? count, count)
        while i < stop {
            let p = i / Self.pageEntries
            let pageStart = p * Self.pageEntries
            let pageEnd = min(pageStart + Self.pageEntries, stop)
            let more = try withEntries(page: p) { entries in
                try entries[..<(pageEnd - pageStart + entries.startIndex)].withUnsafeBufferPointer { b in
                    var k = i - pageStart
                    while let found = Self.firstIndex(in: b, from: k, notEqualTo: value) {
                        guard try body(pageStart + found, b[found]) else { return false }
                        k = found + 1
                    }
                    return true
                }
            }
            if !more { return }
            i = pageEnd
        }
    }

    /// The entries of page `p` (a slice of the resident table, or the cached page).
    private func withEntries<T>(page p: Int, _ body: (ArraySlice<Entry>) throws -> T) throws -> T {
        if let resident {
            let a = p * Self.pageEntries
            return try body(resident[a..<min(a + Self.pageEntries, count)])
        }
        return try body(try page(p)[...])
    }
}
