/// A qcow2 internal snapshot, listed but never read.
public struct SnapshotInfo: Sendable, Equatable {
    public var id: String
    public var name: String
    public var vmStateSize: UInt64
    public var dateSec: UInt32
    public var dateNsec: UInt32
    public var vmClockNsec: UInt64
    public var icount: UInt64?

    var json: JSON {
        var pairs: [(String, JSON)] = []
        if let icount { pairs.append(("icount", .uint(icount))) }
        pairs += [
            ("vm-clock-nsec", .uint(vmClockNsec % 1_000_000_000)),
            ("name", .string(name)),
            ("date-sec", .uint(UInt64(dateSec))),
            ("date-nsec", .uint(UInt64(dateNsec))),
            ("vm-clock-sec", .uint(vmClockNsec / 1_000_000_000)),
            ("id", .string(id)),
            ("vm-state-size", .uint(vmStateSize)),
        ]
        return .object(pairs)
    }
}

/// What `imgconv info` reports: the same fields, keys and meanings as `qemu-img info --output=json`.
public struct ImageInfo: Sendable {
    public var filename: String
    /// qemu-img's name of the format (`qcow2`, `vpc`; `qed` for a format imgconv only recognises).
    public var formatName: String
    public var virtualSize: UInt64
    public var actualSize: UInt64?
    public var clusterSize: UInt64?
    public var dirty: Bool = false
    public var encrypted: Bool = false
    public var backingFilename: String?
    public var backingFormat: String?
    public var snapshots: [SnapshotInfo] = []
    /// `format-specific.data`, in qemu's key order; nil for formats qemu reports none for.
    public var specific: JSON?

    public init(filename: String, format: ImageFormat, virtualSize: UInt64) {
        self.init(filename: filename, formatName: format.rawValue, virtualSize: virtualSize)
    }

    public init(filename: String, formatName: String, virtualSize: UInt64) {
        self.filename = filename
        self.formatName = formatName
        self.virtualSize = virtualSize
    }

    public var json: JSON {
        var p: [(String, JSON)] = []
        if !snapshots.isEmpty { p.append(("snapshots", .array(snapshots.map(\.json)))) }
        p.append(("virtual-size", .uint(virtualSize)))
        p.append(("filename", .string(filename)))
        if let clusterSize { p.append(("cluster-size", .uint(clusterSize))) }
        p.append(("format", .string(formatName)))
        if let actualSize { p.append(("actual-size", .uint(actualSize))) }
        if encrypted { p.append(("encrypted", .bool(true))) }
        if let specific { p.append(("format-specific", .object([("type", .string(formatName)), ("data", specific)]))) }
        if let backingFilename {
            p.append(("backing-filename", .string(backingFilename)))
            p.append(("full-backing-filename", .string(backingFilename)))
            if let backingFormat { p.append(("backing-filename-format", .string(backingFormat))) }
        }
        p.append(("dirty-flag", .bool(dirty)))
        return .object(p)
    }

    /// The human form, laid out like qemu-img info's.
    public var human: String {
        var out = "image: \(filename)\nfile format: \(formatName)\n"
        out += "virtual size: \(humanSize(virtualSize)) (\(virtualSize) bytes)\n"
        out += "disk size: \(actualSize.map(humanSize) ?? "unavailable")\n"
        if let clusterSize { out += "cluster_size: \(clusterSize)\n" }
        if let backingFilename {
            out += "backing file: \(backingFilename) (never opened by imgconv)\n"
            if let backingFormat { out += "backing file format: \(backingFormat)\n" }
        }
        if encrypted { out += "encrypted: yes\n" }
        if !snapshots.isEmpty {
            out += "Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK\n"
            for s in snapshots {
                out += "\(s.id.padding(10))\(s.name.padding(18))\(humanSize(s.vmStateSize).padding(23))\(s.dateSec)\n"
            }
        }
        if let specific, case let .object(pairs) = specific, !pairs.isEmpty {
            out += "Format specific information:\n"
            out += Self.humanLines(pairs, indent: 4)
        }
        return out
    }

    private static func humanLines(_ pairs: [(String, JSON)], indent: Int) -> String {
        let pad = String(repeating: " ", count: indent)
        var out = ""
        for (k, v) in pairs {
            let key = k.replacingDashes()
            switch v {
            case let .object(sub):
                out += "\(pad)\(key):\n" + humanLines(sub, indent: indent + 4)
            case let .array(items):
                out += "\(pad)\(key):\n"
                for (i, item) in items.enumerated() {
                    if case let .object(sub) = item {
                        out += "\(pad)    [\(i)]:\n" + humanLines(sub, indent: indent + 8)
                    } else {
                        out += "\(pad)    [\(i)]: \(item.plain)\n"
                    }
                }
            default:
                out += "\(pad)\(key): \(v.plain)\n"
            }
        }
        return out
    }
}

extension JSON {
    var plain: String {
        if case let .string(s) = self { return s }
        return compact()
    }
}

extension String {
    func replacingDashes() -> String { String(map { $0 == "-" ? " " : $0 }) }
    func padding(_ n: Int) -> String { count >= n ? self + " " : self + String(repeating: " ", count: n - count) }
}

/// Sizes as qemu prints them: "10 MiB", "196 KiB", "1.5 GiB".
public func humanSize(_ v: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var i = 0
    var d = Double(v)
    while d >= 1024 && i < units.count - 1 { d /= 1024; i += 1 }
    if i == 0 { return "\(v) B" }
    if d >= 100 || d == d.rounded() { return "\(Int(d.rounded())) \(units[i])" }
    let s = d >= 10 ? (d * 10).rounded() / 10 : (d * 100).rounded() / 100
    var text = String(s)
    while text.hasSuffix("0") { text.removeLast() }
    if text.hasSuffix(".") { text.removeLast() }
    return "\(text) \(units[i])"
}
