import Convert
import Foundation
import ImageFormats
import Testing

/// One output of `imgconv convert`: a format and its options.
struct Target: CustomTestStringConvertible, Sendable {
    var format: ImageFormat
    var args: [String] = []
    /// The format keeps the exact virtual size (vpc without force_size rounds up to a CHS geometry).
    var exactSize = true
    var testDescription: String { ([format.rawValue] + args).joined(separator: " ") }
}

let roundTripSources: [(String, ImageFormat, [String])] = [
    ("raw", .raw, []),
    ("qcow2 zlib", .qcow2, ["-c"]),
    ("vmdk streamOptimized", .vmdk, ["-o", "subformat=streamOptimized"]),
    ("vpc dynamic", .vpc, ["-o", "force_size=on"]),
    ("vdi dynamic", .vdi, []),
]

let roundTripTargets: [Target] = [
    Target(format: .raw),
    Target(format: .raw, args: ["-o", "preallocation=falloc"]),
    Target(format: .qcow2),
    Target(format: .qcow2, args: ["-o", "compat=0.10"]),
    Target(format: .qcow2, args: ["-o", "cluster_size=4k"]),
    Target(format: .qcow2, args: ["-o", "cluster_size=2M"]),
    Target(format: .qcow2, args: ["-c"]),
    Target(format: .qcow2, args: ["-c", "-o", "compression_type=zstd"]),
    Target(format: .vmdk),
    Target(format: .vmdk, args: ["-o", "subformat=streamOptimized"]),
    Target(format: .vpc, exactSize: false),
    Target(format: .vpc, args: ["-o", "subformat=fixed"], exactSize: false),
    Target(format: .vpc, args: ["-o", "force_size=on"]),
    Target(format: .vdi),
    Target(format: .vdi, args: ["-o", "static=on"]),
]

struct RoundTripCase: CustomTestStringConvertible, Sendable {
    var source: String
    var sourceFormat: ImageFormat
    var sourceArgs: [String]
    var target: Target
    var testDescription: String { "\(source) -> \(target.testDescription)" }
}

let roundTripCases: [RoundTripCase] = roundTripSources.flatMap { s in
    roundTripTargets.map { RoundTripCase(source: s.0, sourceFormat: s.1, sourceArgs: s.2, target: $0) }
}

@Suite("round trips: every source format to every target, checked by qemu-img", .enabled(if: qemuAvailable, "qemu-img not installed"))
struct RoundTripTests {
    @Test(arguments: roundTripCases)
    func convert(_ c: RoundTripCase) throws {
        let dir = try temporaryDirectory("rt")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = dir + "/base.raw"
        try writeBaseImage(base, size: 10 << 20 + 512)
        let src = dir + "/src." + c.sourceFormat.rawValue
        try run(["qemu-img", "convert", "-f", "raw", "-O", c.sourceFormat.rawValue] + c.sourceArgs + [base, src])
        let dst = dir + "/dst." + c.target.format.rawValue
        try run([imgconvBinary, "convert", "-f", c.sourceFormat.rawValue, "-O", c.target.format.rawValue]
                + c.target.args + [src, dst])
        let f = c.target.format.rawValue
        // qemu-img reads the same disk (the larger image's extra area, if any, reads as zero).
        let cmp = try run(["qemu-img", "compare", "-f", c.sourceFormat.rawValue, "-F", f, src, dst], allowFailure: true)
        #expect(cmp.status == 0, "qemu-img compare: \(cmp.out)\(cmp.err)")
        // qemu-img check is clean (qemu has no check for raw and vpc).
        if [.qcow2, .vmdk, .vdi].contains(c.target.format) {
            let chk = try run(["qemu-img", "check", "-f", f, dst], allowFailure: true)
            #expect(chk.status == 0, "qemu-img check: \(chk.out)\(chk.err)")
        }
        // qemu-img and imgconv agree on the virtual size; it is the source's unless the format rounds it.
        let qi = try parseJSON(run(["qemu-img", "info", "-f", f, "--output=json", dst]).out) as! [String: Any]
        let ours = try ImageOpener.open(path: dst, declared: c.target.format)
        let source = try ImageOpener.open(path: src, declared: c.sourceFormat)
        #expect(UInt64(qi["virtual-size"] as! Int) == ours.virtualSize)
        if c.target.exactSize && c.sourceFormat != .vpc || c.target.format == .vpc && c.target.args.contains("force_size=on") {
            #expect(ours.virtualSize == source.virtualSize)
        }
        // Our reader reads what our writer wrote, and our check finds nothing.
        let a = try readAllBytes(source), b = try readAllBytes(ours)
        #expect(b.count >= a.count)
        #expect(Array(b[0..<a.count]) == a)
        #expect(b[a.count...].allSatisfy { $0 == 0 })
        #expect(try ours.check().exitCode == 0)
        // Sparse: nothing was written for the holes of a 10 MiB disk holding about 1.2 MiB of data.
        if c.target.format != .raw || !c.target.args.contains("preallocation=falloc") {
            let size = try FileManager.default.attributesOfItem(atPath: dst)[.size] as! UInt64
            let allocated = try FileStorage(path: dst).allocatedBytes!
            // With 2 MiB clusters every touched cluster and each metadata table is 2 MiB.
            let limit: UInt64 = c.target.args.contains("cluster_size=2M") ? 20 << 20 : 5 << 20
            #expect(allocated < limit, "\(allocated) bytes allocated of \(size)")
        }
    }

    @Test func sameFormatAndBackAgain() throws {
        // qcow2 -> vmdk -> vpc -> vdi -> qcow2 -c -> raw equals the original.
        let dir = try temporaryDirectory("chain")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try writeBaseImage(dir + "/0.raw", size: 10 << 20 + 512)
        let chain: [(ImageFormat, [String])] = [(.qcow2, []), (.qcow2, ["-o", "cluster_size=512"]), (.vmdk, []),
                                                 (.vpc, ["-o", "force_size=on"]), (.vdi, []), (.qcow2, ["-c"]), (.raw, [])]
        var prev = dir + "/0.raw"
        for (i, (f, args)) in chain.enumerated() {
            let next = dir + "/\(i + 1).\(f.rawValue)"
            try run([imgconvBinary, "convert", "-O", f.rawValue] + args + [prev, next])
            prev = next
        }
        #expect(try sha256(prev) == sha256(dir + "/0.raw"))
    }
}

func readAllBytes(_ image: any DiskImage) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Int(image.virtualSize))
    try out.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
    return out
}
