/// The outcome of `imgconv check`, with qemu-img check's counters and exit codes.
public struct CheckResult: Sendable {
    public var filename: String
    public var format: ImageFormat
    /// Metadata or references that are wrong: reading the image may return wrong data.
    public var corruptions: Int = 0
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

/// Finds host ranges that overlap or pass the end of the file: the structural check every format shares.
/// Ranges are named by a static kind and an index, so adding one costs no string building (a forged image can
/// add millions).
public struct HostRangeChecker {
    public struct Range {
        var offset: UInt64
        var length: UInt64
        var kind: StaticString
        var index: Int
        var name: String { index < 0 ? "\(kind)" : "\(kind) \(index)" }
    }
    private var ranges: [Range] = []
    public let fileSize: UInt64

    public init(fileSize: UInt64) { self.fileSize = fileSize }

    public mutating func add(_ kind: StaticString, _ index: Int = -1, offset: UInt64, length: UInt64) {
        ranges.append(Range(offset: offset, length: length, kind: kind, index: index))
    }

    /// Reports each range past the end of the file and each overlap between two ranges.
    public func report(into result: inout CheckResult) {
        for r in ranges where r.offset > fileSize || r.length > fileSize - r.offset {
            result.corruption("\(r.name) at offset \(r.offset) (length \(r.length)) lies past the end of the file (\(fileSize) bytes)")
        }
        let sorted = ranges.filter { $0.length > 0 }.sorted { $0.offset < $1.offset }
        var maxEnd: UInt64 = 0
        var owner: Range?
        for r in sorted {
            if let o = owner, r.offset < maxEnd {
                result.corruption("\(r.name) at offset \(r.offset) overlaps \(o.name) at offset \(o.offset)")
            }
            if r.offset &+ r.length > maxEnd {
                maxEnd = r.offset &+ r.length
                owner = r
            }
        }
    }
}
