import ImageFormats
import SystemIO
#if canImport(Glibc)
import Glibc
#endif

/// One run of the output, ready to be written: the converter's workers make it (`ImageSink.encode`, in
/// parallel), the writer hands it to the sink (`ImageSink.write`, in order of offset).
public struct EncodedRun: @unchecked Sendable {
    /// Virtual offset of the run; a multiple of the sink's unit.
    public var offset: UInt64
    /// The bytes as read (valid until `write` returns; never zero units).
    public var data: UnsafeRawBufferPointer
    /// For compressing sinks: the compressed form of each unit of `data`, in order; nil when stored as is.
    public var compressed: [[UInt8]]?

    public init(offset: UInt64, data: UnsafeRawBufferPointer, compressed: [[UInt8]]? = nil) {
        self.offset = offset
        self.data = data
        self.compressed = compressed
    }
}

/// Where converted bytes go. The converter hands the sink runs of whole units (clusters, grains; for raw the
/// zero-detection granule) that are not all zero, in increasing offset order; it never hands it zeros or holes.
/// On any error or interruption it calls `abort`, which removes everything the sink created.
public protocol ImageSink: AnyObject {
    /// The allocation unit: zero detection and `write` work in whole units (the last may be partial).
    var unit: Int { get }
    /// Prepares an image of `virtualSize` bytes.
    func begin(virtualSize: UInt64) throws
    /// Prepares a run for writing (compression): called from several threads at once, so it must not touch
    /// shared state. The default stores the bytes as they are.
    func encode(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws -> EncodedRun
    /// Stores a run. Called in increasing offset order from one thread. The run's bytes may still be in flight
    /// when this returns (direct I/O): they stay valid until `drain` returns.
    func write(_ run: EncodedRun) throws
    /// Waits until every write `write` left in flight is done; throws the first that failed. The converter calls
    /// it before it reuses the buffers of the runs it handed over.
    func drain() throws
    /// Makes `offset ..< offset+length` read as zero, for a target that was not created empty (`-n`).
    func zero(at offset: UInt64, length: UInt64) throws
    /// Writes the metadata, fsyncs and renames the result into place.
    func finish() throws
    /// Removes any partial output. Never throws: it runs on the error path.
    func abort()
    /// The file the sink writes, when it writes one.
    var outputFile: OutputFile? { get }
}

extension ImageSink {
    public func encode(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws -> EncodedRun {
        EncodedRun(offset: offset, data: data)
    }
    public func zero(at offset: UInt64, length: UInt64) throws {
        throw SinkError.unsupportedOutput("this output format cannot be written into an existing image (-n)")
    }
    public var outputFile: OutputFile? { nil }
    public func drain() throws { try outputFile?.drain() }
}

extension EncodedRun {
    /// Splits the run at `blockSize` boundaries: (block index, offset in the block, the bytes of that piece).
    func forEachBlockPiece(_ blockSize: UInt64, _ body: (Int, UInt64, UnsafeRawBufferPointer) throws -> Void) rethrows {
        var pos = 0
        while pos < data.count {
            let off = offset + UInt64(pos)
            let n = Int(min(UInt64(data.count - pos), blockSize - off % blockSize))
            try body(Int(off / blockSize), off % blockSize, UnsafeRawBufferPointer(rebasing: data[pos..<(pos + n)]))
            pos += n
        }
    }
}

/// Errors of writing an output.
public enum SinkError: Error, CustomStringConvertible, Equatable {
    case io(operation: String, path: String, errno: Int32)
    case unsupportedOutput(String)
    case invalidOption(String)
    case cancelled

    public var description: String {
        switch self {
        case let .io(op, path, err):
            var hint = ""
            if err == ENOSPC || err == EDQUOT { hint = ": the target file system is full; free space or choose another target" }
            return "\(op) '\(path)' failed: \(errnoName(err)) (\(String(cString: strerror(err))))\(hint)"
        case let .unsupportedOutput(s): return s
        case let .invalidOption(s): return "invalid option: \(s)"
        case .cancelled: return "interrupted; no output was left behind"
        }
    }
}

/// How a raw output is preallocated (qemu-img's `-o preallocation=`).
public enum Preallocation: String, Sendable {
    case off, falloc, full
}

/// A sink whose output can share blocks with a source file (`FileClone`): where the image stores a run verbatim in
/// a file on the output's file system, the converter clones it instead of reading and writing it.
public protocol ExtentCloningSink: ImageSink {
    /// The alignment clones from `source` must respect (the file system's block size), or nil when `source` can
    /// never be cloned into this output (another file system, an existing target written in place).
    func cloneAlignment(from source: FileStorage) -> UInt64?
    /// Shares `length` bytes at `hostOffset` of `source` into the output at `offset`. A `FileError` whose errno
    /// `FileClone.isRefusal` accepts means the file system would not; the caller copies the bytes instead.
    func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws
}

/// Where the image sinks put their data: on 4 KiB, so that it goes out with O_DIRECT without sharing a page with
/// metadata, and can take clones (VHD blocks, VDI's data area; qcow2 clusters are their own size).
let sinkDataAlignment: UInt64 = 4096

extension ExtentCloningSink {
    /// Clones `length` bytes at `hostOffset` of `source` to virtual `offset` of an output whose blocks of
    /// `blockSize` bytes `place` puts in the file (allocating a block on first use, as `write` does, and returning
    /// the host offset of its first byte): one FICLONERANGE per stretch contiguous on both sides. What no run
    /// covers of a block stays a hole and reads as zeros.
    func cloneThroughBlocks(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64,
                            blockSize: UInt64, into file: OutputFile, place: (UInt64) throws -> UInt64) throws {
        var pos = offset, src = hostOffset
        let end = offset + length
        var piece: (dst: UInt64, src: UInt64, length: UInt64) = (0, 0, 0)
        func flush() throws {
            guard piece.length > 0 else { return }
            try FileClone.cloneRange(from: source.descriptor, at: piece.src, length: piece.length, to: file.fd,
                                     at: piece.dst, path: file.currentPath)
            piece.length = 0
        }
        while pos < end {
            let inBlock = pos % blockSize
            let n = min(blockSize - inBlock, end - pos)
            let dst = try place(pos / blockSize) + inBlock
            if piece.length > 0 && piece.dst + piece.length == dst && piece.src + piece.length == src {
                piece.length += n
            } else {
                try flush()
                piece = (dst, src, n)
            }
            pos += n
            src += n
        }
        try flush()
    }

    /// The alignment a new output `file` can take clones from `source` at: the file system's block, when it shares
    /// extents, `source` is on it, and the block divides `dataAlignment` (where the format puts its data).
    func cloneAlignment(of file: OutputFile, from source: FileStorage, dataAlignment: UInt64) -> UInt64? {
        guard file.fd >= 0, FileClone.mayShareExtents(file.fd), FileClone.sameFileSystem(source.descriptor, file.fd),
              let block = FileClone.blockSize(file.fd), dataAlignment % block == 0 else { return nil }
        return block
    }
}

/// A sparse raw file: sized with ftruncate, only data is written into it. Holes are never written.
public final class RawFileSink: ImageSink {
    public let unit: Int
    let file: OutputFile
    let preallocation: Preallocation
    let inPlace: Bool
    private var size: UInt64 = 0

    /// `unit` is the zero-detection granularity (qemu-img's -S); `mode` the new file's permission bits.
    public init(path: String, unit: Int = 4096, preallocation: Preallocation = .off, inPlace: Bool = false,
                mode: mode_t = 0o644) {
        self.unit = unit
        self.file = OutputFile(path: path, inPlace: inPlace, mode: mode)
        self.preallocation = preallocation
        self.inPlace = inPlace
    }

    public var temporaryPath: String? { file.temporaryPath }
    public var outputFile: OutputFile? { file }

    public func begin(virtualSize: UInt64) throws {
        size = virtualSize
        try file.create()
        if inPlace {
            var st = stat()
            fstat(file.fd, &st)
            if UInt64(st.st_size) < virtualSize {
                throw SinkError.unsupportedOutput("the existing target '\(file.path)' (\(st.st_size) bytes) is smaller than the image (\(virtualSize) bytes)")
            }
            return
        }
        try file.truncate(virtualSize)
        switch preallocation {
        case .off: break
        case .falloc: try file.allocate(0, virtualSize)
        case .full:
            // Write zeros over the whole file (what `full` promises), 1 MiB at a time.
            let zeros = [UInt8](repeating: 0, count: 1 << 20)
            var pos: UInt64 = 0
            while pos < virtualSize {
                let n = Int(min(UInt64(zeros.count), virtualSize - pos))
                try zeros.withUnsafeBytes { try file.pwriteAll(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
                pos += UInt64(n)
            }
        }
    }

    public func write(_ run: EncodedRun) throws {
        try file.submit(run.data, at: run.offset)
    }

    public func zero(at offset: UInt64, length: UInt64) throws {
        // Punch a hole (keep the size); fall back to writing zeros where the file system cannot.
        let punchHole: Int32 = 0x02, keepSize: Int32 = 0x01
        if fallocate(file.fd, punchHole | keepSize, off_t(offset), off_t(length)) == 0 { return }
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var pos = offset
        while pos < offset + length {
            let n = Int(min(UInt64(zeros.count), offset + length - pos))
            try zeros.withUnsafeBytes { try file.pwriteAll(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
            pos += UInt64(n)
        }
    }

    public func finish() throws { try file.commit() }
    /// In place there is no temporary file: the existing target is closed and stays.
    public func abort() { file.discard() }
}

extension RawFileSink: ExtentCloningSink {
    /// Only a file this sink created, sparse: an existing target keeps its own blocks (`-n`), and a preallocated
    /// one was asked to own its blocks.
    public func cloneAlignment(from source: FileStorage) -> UInt64? {
        guard !inPlace, preallocation == .off else { return nil }
        // A raw file's data starts at offset 0: any block size up to the converter's 1 MiB windows will do.
        return cloneAlignment(of: file, from: source, dataAlignment: 1 << 20)
    }

    public func clone(from source: FileStorage, at hostOffset: UInt64, length: UInt64, to offset: UInt64) throws {
        try FileClone.cloneRange(from: source.descriptor, at: hostOffset, length: length, to: file.fd, at: offset,
                                 path: file.currentPath)
    }
}
