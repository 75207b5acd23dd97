import ImageFormats

/// The one path every fuzz harness drives: detect, inspect (which opens and checks), then map and read the
/// image as the converter would. Any input must end in a verdict or a typed error: never a crash, a hang or
/// unbounded memory. The regression tests run the same function over `fuzz/regressions/`.
public enum FuzzKit {
    /// Reads at most this much virtual data (and 256 extents) per input, so a forged 64 TiB disk costs no time.
    static let readBudget: UInt64 = 1 << 20

    public static func run(_ bytes: [UInt8], declared: ImageFormat?) {
        let storage = MemoryStorage(bytes, name: "fuzz")
        _ = try? FormatDetector.candidates(storage)
        _ = try? ImageInspector.signatures(storage)
        var options = OpenOptions()
        options.metadataCacheBytes = 1 << 20
        let (_, opened) = ImageInspector.inspect(storage: storage, declared: declared, options: options)
        guard let image = opened ?? (try? ImageOpener.open(storage: storage, declared: declared, options: options)) else {
            return
        }
        _ = image.info().json.pretty()
        var pos: UInt64 = 0
        var budget = readBudget
        var steps = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while pos < image.virtualSize && budget > 0 && steps < 256 {
            steps += 1
            guard let e = try? image.extent(at: pos, maxLength: 1 << 20) else { return }
            guard e.length > 0, e.start == pos else { fatalError("extent \(e) does not start at \(pos)") }
            if e.status == .data {
                let n = Int(min(e.length, UInt64(buffer.count), budget))
                let ok: Bool = buffer.withUnsafeMutableBytes { b in
                    (try? image.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: pos)) != nil
                }
                if !ok { return }
                budget -= UInt64(n)
            }
            pos = e.end
        }
    }
}
