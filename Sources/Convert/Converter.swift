import Dispatch
import ImageFormats
import SystemIO
import Logging
import Synchronization

/// Conversion settings, validated once before any work starts.
public struct ConvertOptions: Sendable {
    /// Bytes read per work item. 1 MiB beat 4 MiB for sparse copies on this hardware (SWIFT_STACK.md).
    public var chunkSize: Int = 1 << 20
    /// Worker threads for reads, decompression, zero detection and compression (qemu-img's -m).
    public var workers: Int = max(1, min(8, System.coreCount))
    /// The target was not created by us and may hold old data: zero the ranges we skip (`-n` without
    /// `--target-is-zero`).
    public var zeroSkippedRanges = false
    /// Threads for the workers and the writer: nil, Dispatch's (the CLI, at full priority); the agent passes
    /// `WorkerPool.background`, so its conversions run at background priority (`Niceness`).
    public var pool: WorkerPool?
    /// Share the blocks of runs the image stores verbatim, block-aligned, in a file on the output's file system
    /// (XFS, btrfs: `FileClone`) instead of reading and writing them, where the sink takes clones (raw output
    /// always; image formats with `OutputSpec.copyOffload`). Where the file system refuses, the bytes are copied.
    public var cloneExtents = true

    public init() {}

    /// What the agent converts with: its background pool.
    public static var background: ConvertOptions {
        var o = ConvertOptions()
        o.pool = .background
        o.workers = min(o.workers, WorkerPool.background.threads)
        return o
    }

    public func validated() throws -> ConvertOptions {
        guard chunkSize >= 64 << 10, chunkSize <= 64 << 20 else {
            throw SinkError.invalidOption("chunk size must be 64 KiB to 64 MiB, got \(chunkSize)")
        }
        guard (1...64).contains(workers) else { throw SinkError.invalidOption("-m must be 1 to 64, got \(workers)") }
        return self
    }
}

public enum System {
    public static var coreCount: Int {
        #if canImport(Glibc)
        return Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #else
        return 2
        #endif
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// What a conversion did.
public struct ConvertStats: Sendable, Equatable {
    public var virtualSize: UInt64 = 0
    /// Bytes read from the source (data windows).
    public var bytesRead: UInt64 = 0
    /// Virtual bytes handed to the sink (whole units holding data).
    public var bytesWritten: UInt64 = 0
    /// Bytes of read windows found to be zero and not written.
    public var zeroBytesSkipped: UInt64 = 0
    /// Bytes never read because the map says they are zero or unallocated.
    public var holeBytes: UInt64 = 0
    /// Data bytes shared with the source file instead of copied (`ConvertOptions.cloneExtents`).
    public var bytesCloned: UInt64 = 0
}

/// Copies an image into a sink by walking its extents: only data is read, only non-zero units are written.
/// It knows nothing about formats; the image answers "what is here?" and the sink takes runs of units.
///
/// Pipeline: a planner walks the map and cuts the data into windows of `chunkSize`; workers read, zero-detect
/// and encode (compress) a batch of windows in parallel; the writer stores the batch in offset order while the
/// workers prepare the next one. Memory: two batches of `2 x workers` windows, whatever the image size.
public struct Converter: Sendable {
    public let options: ConvertOptions
    /// Polled between windows; true stops the conversion (SIGINT).
    public let cancel: @Sendable () -> Bool
    /// Called from the writer after each window with (bytes done, virtual size).
    public let progress: (@Sendable (UInt64, UInt64) -> Void)?
    let logger = Logger(label: "imgconv.convert")

    public init(options: ConvertOptions = ConvertOptions(), cancel: @escaping @Sendable () -> Bool = { false },
                progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) throws {
        self.options = try options.validated()
        self.cancel = cancel
        self.progress = progress
    }

    /// Converts `image` into `sink`. On any error or cancellation the sink is aborted: nothing partial remains.
    @discardableResult
    public func convert(_ image: any DiskImage, to sink: any ImageSink) throws -> ConvertStats {
        do {
            try sink.begin(virtualSize: image.virtualSize)
            let stats = try copy(image, to: sink)
            if cancel() { throw SinkError.cancelled }
            try sink.finish()
            logger.debug("converted", metadata: ["read": "\(stats.bytesRead)", "written": "\(stats.bytesWritten)"])
            return stats
        } catch {
            sink.abort()
            throw error
        }
    }

    struct Window {
        var offset: UInt64
        var length: Int
        /// Set when the whole window's data is shared with the source file instead of read.
        var clones: [CloneRun]? = nil
    }

    /// A run of a window the image stores verbatim at `host` in `files[file]`.
    struct CloneRun: Equatable {
        var file: Int
        var host: UInt64
        var length: UInt64
        var offset: UInt64
    }

    /// Which of the image's files can be cloned into the sink, and at which alignment.
    final class ClonePlan: @unchecked Sendable {
        let sink: any ExtentCloningSink
        let sources: [Int: (storage: FileStorage, alignment: UInt64)]
        /// Set by the writer when the file system refused a clone: later windows are read and written.
        let refused = Atomic<Bool>(false)
        /// What the writer did with the windows planned as clones: bytes cloned, and for those copied after a
        /// refusal, bytes read, written and found zero.
        let tally = Mutex(ConvertStats())

        init?(_ image: any DiskImage, _ sink: any ImageSink) {
            guard let cloning = sink as? any ExtentCloningSink else { return nil }
            var sources: [Int: (storage: FileStorage, alignment: UInt64)] = [:]
            for (i, f) in image.files.enumerated() {
                if let storage = f as? FileStorage, let a = cloning.cloneAlignment(from: storage), a > 0 { sources[i] = (storage, a) }
            }
            guard !sources.isEmpty else { return nil }
            self.sink = cloning
            self.sources = sources
        }

        /// The window's data as clone runs, or nil when any of it is compressed, in another file, or not aligned
        /// to the file system's blocks (it is read then). Zero and unallocated runs stay holes in the new file.
        func runs(_ image: any DiskImage, _ w: Window) throws -> [CloneRun]? {
            var out: [CloneRun] = []
            var pos = w.offset
            let end = w.offset + UInt64(w.length)
            while pos < end {
                let seg = try image.segment(at: pos, until: end)
                guard seg.start <= pos, seg.start + seg.length > pos else { return nil }
                let n = min(seg.start + seg.length, end) - pos
                switch seg.mapping {
                case .zero, .unallocated: break
                case .compressed: return nil
                case let .data(file, host):
                    guard let a = sources[file]?.alignment else { return nil }
                    let h = host + (pos - seg.start)
                    guard h % a == 0, pos % a == 0, n % a == 0 else { return nil }
                    if let last = out.last, last.file == file, last.host + last.length == h, last.offset + last.length == pos {
                        out[out.count - 1].length += n
                    } else {
                        out.append(CloneRun(file: file, host: h, length: n, offset: pos))
                    }
                }
                pos += n
            }
            return out
        }
    }

    /// The result of one window: its runs, encoded, plus counters.
    struct WindowResult: @unchecked Sendable {
        var runs: [EncodedRun] = []
        /// Zero units skipped inside the window, kept only when the target must be zeroed there (-n).
        var zeros: [(UInt64, UInt64)] = []
        var written: UInt64 = 0
        var zeroSkipped: UInt64 = 0
    }

    /// Cuts the disk into data windows (unit-aligned), skipping holes; calls `skip` for each skipped range.
    struct Planner {
        let image: any DiskImage
        let unit: UInt64
        let chunk: UInt64
        var pos: UInt64 = 0
        /// Holes shorter than this inside a window are read (as zeros, no I/O) rather than cut around: cutting
        /// costs a window per hole on fragmented images.
        static let minimumSkippedHole: UInt64 = 64 << 10

        mutating func next(skip: (UInt64, UInt64) throws -> Void) throws -> Window? {
            let size = image.virtualSize
            while pos < size {
                var ext = try image.extent(at: pos, maxLength: chunk)
                if ext.readsAsZero && ext.length == chunk {
                    ext = try image.extent(at: pos)  // a long hole: skip all of it at once
                }
                if ext.readsAsZero {
                    let end = ext.end >= size ? size : ext.end / unit * unit
                    if end > pos {
                        try skip(pos, end - pos)
                        pos = end
                        continue
                    }
                }
                // A data window: up to `chunk` bytes, ending where a hole worth skipping begins.
                let limit = min(pos + chunk, size)
                var end = ext.end
                while end < limit {
                    let e = try image.extent(at: end, maxLength: limit - end)
                    if e.readsAsZero && e.length >= Self.minimumSkippedHole { break }
                    end = e.end
                }
                end = min(limit, (end + unit - 1) / unit * unit, size)
                defer { pos = end }
                return Window(offset: pos, length: Int(end - pos))
            }
            return nil
        }
    }

    func copy(_ image: any DiskImage, to sink: any ImageSink) throws -> ConvertStats {
        let unit = sink.unit
        guard unit >= 512, unit <= 64 << 20 else { throw SinkError.invalidOption("sink unit \(unit)") }
        let chunk = max(unit, options.chunkSize / unit * unit)
        var planner = Planner(image: image, unit: UInt64(unit), chunk: UInt64(chunk))
        var stats = ConvertStats(virtualSize: image.virtualSize)
        let batchSize = options.workers * 2
        // Two sets of buffers: the workers fill one while the writer drains the other.
        let buffers = (0..<2).map { _ in
            UnsafeMutableRawBufferPointer.allocate(byteCount: chunk * batchSize, alignment: 4096)
        }
        defer { buffers.forEach { $0.deallocate() } }
        let writer = DispatchQueue(label: "imgconv.convert.writer")
        let pool = options.pool
        let pendingWrite = DispatchGroup()
        // However this returns (a read error, a cancellation), the writer is done first: it writes from `buffers`
        // (freed by the defer above, which runs after this one), and the caller aborts the sink as soon as this
        // throws. Once this has failed, the writer stops at its next window.
        let abandoned = Atomic<Bool>(false)
        defer {
            abandoned.store(true, ordering: .relaxed)
            pendingWrite.wait()
        }
        let writeError = Mutex<(any Error)?>(nil)
        var skipped: [(UInt64, UInt64)] = []
        let zeroSkipped = options.zeroSkippedRanges
        var flip = 0
        let clonePlan = options.cloneExtents && !zeroSkipped ? ClonePlan(image, sink) : nil
        while true {
            if cancel() { throw SinkError.cancelled }
            // Plan a batch.
            var windows: [Window] = []
            while windows.count < batchSize, var w = try planner.next(skip: { off, len in
                stats.holeBytes += len
                if zeroSkipped { skipped.append((off, len)) }
            }) {
                if let clonePlan, !clonePlan.refused.load(ordering: .relaxed) { w.clones = try clonePlan.runs(image, w) }
                windows.append(w)
            }
            let buffer = buffers[flip]
            // Workers: read, detect zeros, encode.
            var results = [WindowResult](repeating: WindowResult(), count: windows.count)
            let firstError = Mutex<(any Error)?>(nil)
            try results.withUnsafeMutableBufferPointer { resultSlots in
                let shared = UnsafeSendable((resultSlots, buffer, sink))
                let wins = windows
                let work: @Sendable (Int) -> Void = { i in
                    if firstError.withLock({ $0 != nil }) { return }
                    do {
                        let (slots, buffer, sink) = shared.value
                        let w = wins[i]
                        if w.clones != nil { return }
                        let buf = UnsafeMutableRawBufferPointer(rebasing: buffer[(i * chunk)..<(i * chunk + w.length)])
                        try image.read(into: buf, at: w.offset)
                        slots[i] = try Self.encodeWindow(UnsafeRawBufferPointer(buf), at: w.offset, unit: unit, sink: sink,
                                                         keepZeros: zeroSkipped)
                    } catch {
                        firstError.withLock { if $0 == nil { $0 = error } }
                    }
                }
                if let pool {
                    pool.concurrentPerform(iterations: wins.count, width: options.workers, work)
                } else {
                    DispatchQueue.concurrentPerform(iterations: wins.count, execute: work)
                }
                if let e = firstError.withLock({ $0 }) { throw e }
            }
            // Wait for the previous batch's writes (they use the other buffer), then hand this batch over.
            pendingWrite.wait()
            if let e = writeError.withLock({ $0 }) { throw e }
            for (w, r) in zip(windows, results) {
                if w.clones != nil { continue }  // counted by the writer (ClonePlan.tally)
                stats.bytesRead += UInt64(w.length)
                stats.bytesWritten += r.written
                stats.zeroBytesSkipped += r.zeroSkipped
            }
            let holes = skipped
            skipped = []
            if windows.isEmpty && holes.isEmpty { break }
            let batch = UnsafeSendable((results, windows, sink))
            let progress = self.progress, size = image.virtualSize, cancel = self.cancel
            pendingWrite.enter()
            let write: @Sendable () -> Void = {
                defer { pendingWrite.leave() }
                do {
                    let (results, windows, sink) = batch.value
                    for (off, len) in holes { try sink.zero(at: off, length: len) }
                    for (w, r) in zip(windows, results) {
                        if cancel() || abandoned.load(ordering: .relaxed) { throw SinkError.cancelled }
                        if let clones = w.clones, let clonePlan {
                            try Self.clone(clones, of: w, image: image, plan: clonePlan)
                        }
                        for (off, len) in r.zeros { try sink.zero(at: off, length: len) }
                        for run in r.runs { try sink.write(run) }
                        progress?(w.offset + UInt64(w.length), size)
                    }
                    // The runs point into this batch's buffer, which the workers refill after the next batch.
                    try sink.drain()
                } catch {
                    try? batch.value.2.drain()
                    writeError.withLock { if $0 == nil { $0 = error } }
                }
            }
            if let pool { pool.submit(write) } else { writer.async(execute: write) }
            if windows.isEmpty { break }
            flip ^= 1
        }
        pendingWrite.wait()
        if let e = writeError.withLock({ $0 }) { throw e }
        if let tally = clonePlan?.tally.withLock({ $0 }) {
            stats.bytesCloned += tally.bytesCloned
            stats.bytesRead += tally.bytesRead
            stats.bytesWritten += tally.bytesWritten
            stats.zeroBytesSkipped += tally.zeroBytesSkipped
        }
        progress?(image.virtualSize, image.virtualSize)
        return stats
    }

    /// Shares a window's runs with the source file; where the file system refuses, reads and writes the window as
    /// usual (and the plan stops cloning).
    static func clone(_ clones: [CloneRun], of w: Window, image: any DiskImage, plan: ClonePlan) throws {
        // Windows planned before a refusal are copied without asking again.
        if !plan.refused.load(ordering: .relaxed) {
            do {
                for c in clones {
                    try plan.sink.clone(from: plan.sources[c.file]!.storage, at: c.host, length: c.length, to: c.offset)
                }
                plan.tally.withLock { $0.bytesCloned += clones.reduce(0) { $0 + $1.length } }
                return
            } catch let e as FileError where FileClone.isRefusal(e.errno) {
                plan.refused.store(true, ordering: .relaxed)
            }
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: w.length, alignment: 4096)
        defer { buffer.deallocate() }
        try image.read(into: buffer, at: w.offset)
        let r = try store(UnsafeRawBufferPointer(buffer), at: w.offset, to: plan.sink)
        plan.tally.withLock {
            $0.bytesRead += UInt64(w.length)
            $0.bytesWritten += r.written
            $0.zeroBytesSkipped += r.zeroSkipped
        }
    }

    /// Stores one buffer of a stream (a download) at `offset` exactly as the converter stores a window: cut into
    /// the sink's units, zero units skipped, runs of non-zero units encoded and written. Returns the bytes written.
    @discardableResult
    public static func writeWindow(_ data: UnsafeRawBufferPointer, at offset: UInt64, to sink: any ImageSink) throws -> UInt64 {
        try store(data, at: offset, to: sink).written
    }

    /// Encodes and writes one buffer in the writer's thread, and drains the sink (the runs point into `data`).
    static func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, to sink: any ImageSink) throws -> WindowResult {
        let r = try encodeWindow(data, at: offset, unit: sink.unit, sink: sink)
        for run in r.runs { try sink.write(run) }
        try sink.drain()
        return r
    }

    /// Splits a window into runs of non-zero units and encodes each.
    static func encodeWindow(_ data: UnsafeRawBufferPointer, at offset: UInt64, unit: Int,
                             sink: any ImageSink, keepZeros: Bool = false) throws -> WindowResult {
        var r = WindowResult()
        var i = 0
        var runStart = -1
        func flush(_ end: Int) throws {
            guard runStart >= 0 else { return }
            let run = UnsafeRawBufferPointer(rebasing: data[runStart..<end])
            r.runs.append(try sink.encode(run, at: offset + UInt64(runStart)))
            r.written += UInt64(end - runStart)
            runStart = -1
        }
        while i < data.count {
            let end = min(data.count, i + unit)
            if ZeroDetector.isZero(UnsafeRawBufferPointer(rebasing: data[i..<end])) {
                try flush(i)
                r.zeroSkipped += UInt64(end - i)
                if keepZeros {
                    if let last = r.zeros.last, last.0 + last.1 == offset + UInt64(i) {
                        r.zeros[r.zeros.count - 1].1 += UInt64(end - i)
                    } else {
                        r.zeros.append((offset + UInt64(i), UInt64(end - i)))
                    }
                }
            } else if runStart < 0 {
                runStart = i
            }
            i = end
        }
        try flush(data.count)
        return r
    }
}

/// Carries a non-Sendable value into a closure whose use is serialised by the converter itself.
struct UnsafeSendable<T>: @unchecked Sendable {
    var value: T
    init(_ v: T) { value = v }
}

/// Word-at-a-time zero test: ~10 GB/s against ~1.7 GB/s for a byte loop (SWIFT_STACK.md).
public enum ZeroDetector {
    @inline(__always)
    public static func isZero(_ b: UnsafeRawBufferPointer) -> Bool {
        guard let base = b.baseAddress else { return true }
        let n = b.count
        var i = 0
        while i < n && (Int(bitPattern: base + i) & 7) != 0 {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        while i + 32 <= n {
            let a = base.load(fromByteOffset: i, as: UInt64.self) | base.load(fromByteOffset: i + 8, as: UInt64.self)
                | base.load(fromByteOffset: i + 16, as: UInt64.self) | base.load(fromByteOffset: i + 24, as: UInt64.self)
            if a != 0 { return false }
            i += 32
        }
        while i < n {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }
}
