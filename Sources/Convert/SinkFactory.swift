import SystemIO
import ImageFormats

/// Builds the sink for an output format from qemu-img's `-O`, `-o key=value,...`, `-c` and `-S`: every key is
/// checked here, before any work starts; an unknown key or a bad value names itself.
public struct OutputSpec: Sendable {
    public var format: ImageFormat
    public var options: [String: String] = [:]
    public var compress = false
    /// -S in bytes (raw output's zero-detection unit; other formats detect zeros per cluster or grain).
    public var zeroGranularity = 4096
    /// -n: write into the existing target instead of creating it.
    public var inPlace = false
    /// -C (qemu-img's copy offloading): qcow2, vpc and vdi output take clones of the source's blocks too (raw
    /// output always does). Not the default: cloned data is not zero-detected, so all-zero data of the source
    /// stays allocated in the image.
    public var copyOffload = false
    /// fsync before the rename (the default; `-t unsafe` turns it off, as qemu-img convert's default does).
    public var durable = true
    /// Write the data with O_DIRECT where the file system takes it (`-t none`, the default); false writes through
    /// the page cache (`-t writeback`, `-t unsafe`).
    public var direct = true

    public init(format: ImageFormat) { self.format = format }

    /// Parses `a=b,c=d` (qemu's -o syntax).
    public static func parseOptions(_ text: String) throws -> [String: String] {
        var out: [String: String] = [:]
        for part in text.split(separator: ",") where !part.isEmpty {
            guard let eq = part.firstIndex(of: "=") else { throw SinkError.invalidOption("'\(part)' (expected key=value)") }
            out[String(part[..<eq])] = String(part[part.index(after: eq)...])
        }
        return out
    }

    /// qemu-style sizes: 4096, 4k, 64K, 1M, 2M.
    public static func parseSize(_ s: String) throws -> Int {
        let units: [Character: Int] = ["b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30]
        var text = s.lowercased()
        var mult = 1
        if let last = text.last, let u = units[last] { mult = u; text.removeLast() }
        guard let v = Int(text), v >= 0, v <= Int.max / mult else { throw SinkError.invalidOption("size '\(s)'") }
        return v * mult
    }

    func flag(_ key: String, _ value: String) throws -> Bool {
        switch value.lowercased() {
        case "on", "true", "yes": return true
        case "off", "false", "no": return false
        default: throw SinkError.invalidOption("\(key)=\(value) (expected on or off)")
        }
    }

    /// -S as the unit of a block-based format: a power of two from 512 bytes to the block size (0: the block).
    func blockUnit(_ block: Int) throws -> Int {
        if zeroGranularity == 0 { return block }
        guard zeroGranularity >= 512, zeroGranularity <= block, zeroGranularity & (zeroGranularity - 1) == 0 else {
            throw SinkError.invalidOption("-S \(zeroGranularity): must be a power of two from 512 bytes to \(block) for \(format.rawValue) output")
        }
        return zeroGranularity
    }

    public func makeSink(path: String) throws -> any ImageSink {
        var o = options
        func take(_ key: String) -> String? { o.removeValue(forKey: key) }
        let sink: any ImageSink
        if inPlace && format != .raw {
            throw SinkError.unsupportedOutput("-n (write into an existing target) is supported for raw output only")
        }
        switch format {
        case .raw:
            if compress { throw SinkError.invalidOption("-c: raw output cannot be compressed") }
            let p = take("preallocation") ?? "off"
            guard let pre = Preallocation(rawValue: p) else { throw SinkError.invalidOption("preallocation=\(p) (off, falloc or full)") }
            guard zeroGranularity == 0 || (zeroGranularity >= 512 && zeroGranularity % 512 == 0 && zeroGranularity <= 64 << 20) else {
                throw SinkError.invalidOption("-S \(zeroGranularity): must be 0 or a multiple of 512 bytes up to 64 MiB")
            }
            // -S 0 turns zero detection off: every window is one unit then, so only all-zero windows are skipped.
            sink = RawFileSink(path: path, unit: zeroGranularity == 0 ? 1 << 20 : zeroGranularity,
                               preallocation: pre, inPlace: inPlace)
        case .qcow2:
            var q = QCOW2Sink.Options()
            switch take("compat") ?? "1.1" {
            case "1.1", "v3": q.version = 3
            case "0.10", "v2": q.version = 2
            case let v: throw SinkError.invalidOption("compat=\(v) (0.10 or 1.1)")
            }
            if let cs = take("cluster_size") {
                let v = try Self.parseSize(cs)
                guard v >= 512, v <= 2 << 20, v & (v - 1) == 0 else {
                    throw SinkError.invalidOption("cluster_size=\(cs) (a power of two from 512 to 2M)")
                }
                q.clusterBits = v.trailingZeroBitCount
            }
            let ct = take("compression_type") ?? "zlib"
            guard ct == "zlib" || ct == "zstd" else { throw SinkError.invalidOption("compression_type=\(ct) (zlib or zstd)") }
            if compress { q.compression = ct == "zstd" ? .zstd : .zlib }
            if let rb = take("refcount_bits") {
                guard let v = Int(rb) else { throw SinkError.invalidOption("refcount_bits=\(rb)") }
                q.refcountBits = v
            }
            if let lr = take("lazy_refcounts") { q.lazyRefcounts = try flag("lazy_refcounts", lr) }
            if let p = take("preallocation"), p != "off" { throw SinkError.invalidOption("preallocation=\(p): qcow2 output supports only off") }
            if ct == "zstd" && q.version == 2 { throw SinkError.invalidOption("compression_type=zstd needs compat=1.1") }
            if ct == "zstd" { q.compression = compress ? .zstd : .none }
            q.copyOffload = copyOffload
            sink = try QCOW2Sink(path: path, options: q, zstdHeader: ct == "zstd")
        case .vmdk:
            let sf = take("subformat") ?? (compress ? "streamOptimized" : "monolithicSparse")
            guard let sub = VMDKSink.Subformat(rawValue: sf) else {
                throw SinkError.invalidOption("subformat=\(sf) (monolithicSparse or streamOptimized)")
            }
            if compress && sub != .streamOptimized { throw SinkError.invalidOption("-c: vmdk compression needs subformat=streamOptimized") }
            sink = VMDKSink(path: path, subformat: sub)
        case .vpc:
            if compress { throw SinkError.invalidOption("-c: vpc output cannot be compressed") }
            let sf = take("subformat") ?? "dynamic"
            guard let sub = VPCSink.Subformat(rawValue: sf) else { throw SinkError.invalidOption("subformat=\(sf) (dynamic or fixed)") }
            let force = try take("force_size").map { try flag("force_size", $0) } ?? false
            sink = VPCSink(path: path, subformat: sub, forceSize: force, unit: try blockUnit(2 << 20), copyOffload: copyOffload)
        case .vdi:
            if compress { throw SinkError.invalidOption("-c: vdi output cannot be compressed") }
            let st = try take("static").map { try flag("static", $0) } ?? false
            sink = VDISink(path: path, isStatic: st, unit: try blockUnit(1 << 20), copyOffload: copyOffload)
        }
        sink.outputFile?.durable = durable
        sink.outputFile?.direct = direct
        if let unknown = o.keys.sorted().first {
            throw SinkError.invalidOption("'\(unknown)' is not an option of the \(format.rawValue) output")
        }
        return sink
    }
}
