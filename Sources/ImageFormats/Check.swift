/// The outcome of `imgconv check`, with qemu-img check's counters and exit codes.
public struct CheckResult: Sendable {
    public var filename: String
    public var format: ImageFormat
    /// Metadata or references that are wrong: reading the image may return wrong data.
    public var corruptions: Int = 0
    /// Of the corruptions, those that are refcount mismatches only (stored refcount below the references, a
    /// COPIED flag that disagrees with it): stale by design in a qcow2 left dirty by lazy refcounts.
    public var refcountErrors: Int = 0
    /// Space marked in use that nothing references: harmless but wasted.
    public var leaks: Int = 0
    /// Errors that stopped the check from completing.
    public var checkErrors: Int = 0
    public var messages: [String] = []
    public var totalClusters: UInt64?
    public var allocatedClusters: UInt64?
    public var fragmentedClusters: UInt64?
    public var compressedClusters: UInt64?
    public var imageEndOffset: UInt64?

    public init(filename: String, format: ImageFormat) {
        self.filename = filename
        self.format = format
    }

    /// Messages kept (counters go on): a forged image can produce millions, and building them costs time.
    public static let maxMessages = 200

    public mutating func corruption(_ message: @autoclosure () -> String) {
        corruptions += 1
        if messages.count < Self.maxMessages { messages.append("ERROR \(message())") }
    }

    public mutating func leak(_ message: @autoclosure () -> String) {
        leaks += 1
        if messages.count < Self.maxMessages { messages.append("Leaked \(message())") }
    }

    /// 0 clean, 2 corrupt, 3 leaks only, 1 the check itself failed: as qemu-img check.
    public var exitCode: Int32 {
        if checkErrors > 0 { return 1 }
        if corruptions > 0 { return 2 }
        if leaks > 0 { return 3 }
        return 0
    }

    public var json: JSON {
        var p: [(String, JSON)] = []
        if let imageEndOffset { p.append(("image-end-offset", .uint(imageEndOffset))) }
        if let totalClusters { p.append(("total-clusters", .uint(totalClusters))) }
        p.append(("check-errors", .int(Int64(checkErrors))))
        if leaks > 0 { p.append(("leaks", .int(Int64(leaks)))) }
        if corruptions > 0 { p.append(("corruptions", .int(Int64(corruptions)))) }
        if let allocatedClusters { p.append(("allocated-clusters", .uint(allocatedClusters))) }
        p.append(("filename", .string(filename)))
        p.append(("format", .string(format.rawValue)))
        if let fragmentedClusters, fragmentedClusters > 0 { p.append(("fragmented-clusters", .uint(fragmentedClusters))) }
        if let compressedClusters, compressedClusters > 0 { p.append(("compressed-clusters", .uint(compressedClusters))) }
        return .object(p)
    }

    public var human: String {
        var out = messages.map { $0 + "\n" }.joined()
        if !messages.isEmpty { out += "\n" }
        if corruptions == 0 && leaks == 0 && checkErrors == 0 {
            out += "No errors were found on the image.\n"
        } else {
            if corruptions > 0 {
                out += "\(corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if leaks > 0 {
                out += "\(leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            }
            if checkErrors > 0 { out += "\(checkErrors) internal errors have occurred during the check.\n" }
        }
        if let total = totalClusters, let alloc = allocatedClusters, total > 0 {
            let pct = { (v: UInt64, of: UInt64) in of == 0 ? "0.00" : fmt2(Double(v) * 100 / Double(of)) }
            out += "\(alloc)/\(total) = \(pct(alloc, total))% allocated, "
                + "\(pct(fragmentedClusters ?? 0, alloc))% fragmented, \(pct(compressedClusters ?? 0, alloc))% compressed clusters\n"
        }
        if let end = imageEndOffset { out += "Image end offset: \(end)\n" }
        return out
    }
}

/// A percentage with two decimals, as qemu prints them ("18.18").
public func fmt2(_ d: Double) -> String {
    let v = Int((d * 100).rounded())
    return "\(v / 100).\(v % 100 < 10 ? "0" : "")\(v % 100)"
}

/// Finds host ranges that pass the end of the file or overlap each other: the structural check every format shares.
///
/// Memory is bounded whatever the file or its tables claim: a bitmap of 512-byte units covers one window of the
/// file at a time (8 MiB of bitmap covers 32 GiB), and the format's walk runs once per window, adding the same
/// ranges in the same order each time. Ranges are named by a static kind and an index, so adding one costs no
/// string building (a forged image can add millions). After `maxErrors` problems the walk stops: a hostile table
/// cannot buy unbounded time with errors.
///
/// `add` answers whether a range was clean, so a walk can skip what a duplicate pointer points to (forged tables
/// point every entry at one table to multiply the work). The other party of an overlap is named by replaying
/// the window's walk: the replay takes the same path, because `add` answers the same, and stops where the walk
/// stopped.
public struct HostRangeChecker {
    public let fileSize: UInt64
    let unit: UInt64
    let windowUnits: UInt64
    /// Units of the current window: `[windowStart, windowStart + windowUnits)`.
    var windowStart: UInt64 = 0
    var bits: [UInt64]
    /// True on the first walk: problems that do not depend on the window are reported then only.
    public private(set) var firstPass = true
    var result: CheckResult
    /// Overlaps found in this window whose other party the replay looks up (at most `maxNamed`).
    var pending: [(unit: UInt64, name: String, offset: UInt64, seq: Int)] = []
    /// Events (ranges and problems) so far in this walk; the replay stops after `stopAt` of them.
    var seq = 0
    var stopAt: Int?
    /// Set during the replay: the names found for `pending`.
    var owners: [Int: String]?
    static let maxNamed = 8
    public static let maxErrors = 10_000

    struct Stop: Error {}

    init(fileSize: UInt64, result: CheckResult, unit: UInt64, windowBytes: Int) {
        self.fileSize = fileSize
        self.unit = unit
        self.result = result
        let fileUnits = max(1, divRoundUp(fileSize, unit))
        windowUnits = min(fileUnits, UInt64(windowBytes) * 8)
        bits = [UInt64](repeating: 0, count: Int(divRoundUp(windowUnits, 64)))
    }

    var replaying: Bool { owners != nil }

    /// Runs `walk` once per window of the file and adds what it found to `result`.
    public static func run(fileSize: UInt64, into result: inout CheckResult, unit: UInt64 = 512, windowBytes: Int = 8 << 20,
                           _ walk: (inout HostRangeChecker) throws -> Void) throws {
        var c = HostRangeChecker(fileSize: fileSize, result: result, unit: unit, windowBytes: windowBytes)
        let fileUnits = divRoundUp(fileSize, unit)
        repeat {
            let messagesBefore = c.result.messages.count
            var stopped = false
            c.seq = 0
            do { try walk(&c) } catch is Stop { stopped = true; c.stopAt = c.seq }
            if !c.pending.isEmpty {
                c.owners = [:]
                c.seq = 0
                c.clearBits()
                do { try walk(&c) } catch is Stop {}
                let named = c.pending.enumerated().map { i, p in
                    "ERROR \(p.name) at offset \(p.offset) overlaps \(c.owners?[i] ?? "another structure")"
                }
                c.result.corruptions += named.count
                // They were found first: they go before the window's other messages.
                let room = max(0, CheckResult.maxMessages - messagesBefore)
                c.result.messages.insert(contentsOf: named.prefix(room), at: messagesBefore)
                if c.result.messages.count > CheckResult.maxMessages {
                    c.result.messages.removeLast(c.result.messages.count - CheckResult.maxMessages)
                }
                c.owners = nil
                c.pending = []
            }
            if stopped {
                c.result.checkErrors += 1
                c.result.messages.append("stopped after \(maxErrors) errors: the image is corrupt or hostile")
                break
            }
            c.firstPass = false
            c.windowStart += c.windowUnits
            c.clearBits()
        } while c.windowStart < fileUnits
        result = c.result
    }

    mutating func clearBits() { for i in bits.indices { bits[i] = 0 } }

    /// Counts an event; the replay ends where the walk ended.
    mutating func step() throws {
        seq += 1
        if replaying, let stopAt, seq > stopAt { throw Stop() }
    }

    /// Records a problem; stops the walk after `maxErrors`.
    mutating func record(_ message: @autoclosure () -> String) throws {
        guard !replaying else { return }
        result.corruption(message())
        if result.corruptions + pending.count >= Self.maxErrors { throw Stop() }
    }

    /// A problem found by the format's own walk (reported on the first pass only).
    public mutating func corruption(_ message: @autoclosure () -> String) throws {
        try step()
        if firstPass { try record(message()) }
    }

    /// Records `offset ..< offset+length`. Returns false when it passes the end of the file or overlaps a range
    /// added before it (in this window).
    @discardableResult
    public mutating func add(_ kind: StaticString, _ index: Int = -1, offset: UInt64, length: UInt64) throws -> Bool {
        guard length > 0 else { return true }
        try step()
        func name() -> String { index < 0 ? "\(kind)" : "\(kind) \(index)" }
        var clean = true
        if offset > fileSize || length > fileSize - offset {
            clean = false
            let size = fileSize
            if firstPass { try record("\(name()) at offset \(offset) (length \(length)) lies past the end of the file (\(size) bytes)") }
        }
        // The part inside the file and inside this window, in units.
        let end = offset > fileSize ? offset : min(fileSize, offset &+ length)
        guard end > offset else { return clean }
        let a = max(offset / unit, windowStart), b = min(divRoundUp(end, unit), windowStart + windowUnits)
        guard a < b else { return clean }
        let lo = Int(a - windowStart), hi = Int(b - windowStart)
        if replaying {
            for (i, p) in pending.enumerated() where owners![i] == nil && a <= p.unit && p.unit < b && seq < p.seq {
                owners![i] = name()
            }
        }
        if let first = firstSet(lo, hi) {
            clean = false
            if !replaying {
                if pending.count < Self.maxNamed {
                    pending.append((windowStart + UInt64(first), name(), offset, seq))
                    if result.corruptions + pending.count >= Self.maxErrors { throw Stop() }
                } else {
                    try record("\(name()) at offset \(offset) overlaps another structure")
                }
            }
        }
        setBits(lo, hi)
        return clean
    }

    private func firstSet(_ lo: Int, _ hi: Int) -> Int? {
        var i = lo
        while i < hi {
            let w = bits[i >> 6]
            if w == 0 && i & 63 == 0 && hi - i >= 64 { i += 64; continue }
            if w & (1 << UInt64(i & 63)) != 0 { return i }
            i += 1
        }
        return nil
    }

    private mutating func setBits(_ lo: Int, _ hi: Int) {
        var i = lo
        while i < hi {
            if i & 63 == 0 && hi - i >= 64 { bits[i >> 6] = .max; i += 64; continue }
            bits[i >> 6] |= 1 << UInt64(i & 63)
            i += 1
        }
    }
}
