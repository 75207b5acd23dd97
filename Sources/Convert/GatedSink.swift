import SystemIO
#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import ImageFormats

/// A sink that publishes nothing until a gate opens: `finish()` first waits for `gate` and, if it throws, aborts
/// the inner sink (its temporary file is removed) and rethrows. The CLI runs the inspection's structural check
/// (every L2 table and refcount block walked) on another thread while the copy runs, and gates the rename on it:
/// a corrupt image costs a discarded temporary file, never a published output.
public final class GatedSink: ImageSink {
    let inner: any ImageSink
    let gate: () throws -> Void

    public init(_ inner: any ImageSink, gate: @escaping () throws -> Void) {
        self.inner = inner
        self.gate = gate
    }

    public var unit: Int { inner.unit }
    public func begin(virtualSize: UInt64) throws { try inner.begin(virtualSize: virtualSize) }
    public func encode(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws -> EncodedRun { try inner.encode(data, at: offset) }
    public func write(_ run: EncodedRun) throws { try inner.write(run) }
    public func zero(at offset: UInt64, length: UInt64) throws { try inner.zero(at: offset, length: length) }
    public func abort() { inner.abort() }
    public var outputFile: OutputFile? { inner.outputFile }

    public func finish() throws {
        do {
            try gate()
        } catch {
            inner.abort()
            throw error
        }
        try inner.finish()
    }

    /// Starts the structural check of `image` on a background thread; the returned gate waits for it and throws
    /// when it found the image unsafe.
    public static func structuralCheck(of image: any DiskImage, name: String) -> () throws -> Void {
        nonisolated(unsafe) var reasons: [SafetyReason] = []
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) let target = image
        DispatchQueue.global().async {
            reasons = ImageInspector.structuralReasons(target)
            done.signal()
        }
        return {
            done.wait()
            guard reasons.isEmpty else {
                let lines = reasons.map { "  \($0)" }.joined(separator: "\n")
                throw SinkError.unsupportedOutput("refusing to convert '\(name)': the image is not safe:\n\(lines)\n"
                                                  + "(--trusted converts a trusted local file anyway)")
            }
        }
    }
}

extension GatedSink: ExtentCloningSink {
    public func cloneAlignment(from source: FileStorage) -> UInt64? {
        (inner as? any ExtentCloningSink)?.cloneAlignment(from: source)
    }

    public func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws {
        guard let cloning = inner as? any ExtentCloningSink else {
            throw FileError("FICLONERANGE", path: outputFile?.currentPath ?? "output", errno: EOPNOTSUPP)
        }
        try cloning.clone(from: source, at: hostOffset, length: length, to: offset)
    }
}
