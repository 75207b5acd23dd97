import Dispatch
import Glance
import RBD
import SystemIO

/// An image file read from the start of an RBD image (a Cinder volume) as a download is: front to back, hashed on
/// the way against Glance's values, each block handed to a `DownloadSink` in order. The same sinks as a Glance
/// download take it (`RBDStreamSink` for a raw image, `GrowingFile` for a conversion that follows), so a base
/// built from a volume goes through the same checks and the same pipeline; only the source differs.
///
/// `depth` reads of `blockSize` are in flight while the oldest is hashed and written: one synchronous read at a
/// time ran at a quarter of the speed (measured: a 1 GiB volume took longer than downloading it through Glance).
/// Memory: `depth × blockSize`, whatever the size.
struct VolumeStream: Sendable {
    let image: RBDImage
    let size: UInt64
    var blockSize = 4 << 20
    var depth = 4

    /// `run` on a thread of its own (as a download's writes have their own queue): it blocks for the whole
    /// stream, and the converter that follows it holds a job thread while it waits for the bytes. Cancelling the
    /// calling task, or `stop`, ends it.
    func stream(into sink: any DownloadSink, imageID: String, expected: [(String, String?)],
                stop: @escaping @Sendable () -> Bool) async throws {
        let token = CancellationToken()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                DispatchQueue(label: "imgconv.volume-stream").async {
                    do {
                        try self.run(into: sink, imageID: imageID, expected: expected, cancelled: { stop() || token.isCancelled })
                        c.resume()
                    } catch {
                        c.resume(throwing: error)
                    }
                }
            }
        } onCancel: {
            token.cancel()
        }
    }

    /// Streams `size` bytes into `sink`; throws `GlanceError.integrity` when a hash differs (after the sink had
    /// every byte: the caller publishes nothing), `CancellationError` when `cancelled` says so.
    func run(into sink: any DownloadSink, imageID: String, expected: [(String, String?)],
             cancelled: () -> Bool) throws {
        var digests = expected.compactMap { ImageDigest(algorithm: $0.0) }
        let buffers = (0..<depth).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096) }
        var inFlight: [(Completion, Int, UInt64, Int)?] = Array(repeating: nil, count: depth)  // completion, buffer, offset, length
        defer {
            // Never free a buffer a read still fills.
            for slot in inFlight { if let (c, _, _, _) = slot { _ = try? c.wait() } }
            buffers.forEach { $0.deallocate() }
        }
        var next: UInt64 = 0
        func issue(_ slot: Int) throws {
            guard next < size else { inFlight[slot] = nil; return }
            let n = Int(min(UInt64(blockSize), size - next))
            let c = try image.aioRead(at: next, into: UnsafeMutableRawBufferPointer(rebasing: buffers[slot][0..<n]))
            inFlight[slot] = (c, slot, next, n)
            next += UInt64(n)
        }
        for slot in 0..<depth { try issue(slot) }
        var slot = 0
        while let (c, b, offset, n) = inFlight[slot] {
            if cancelled() { throw CancellationError() }
            inFlight[slot] = nil
            let got = try c.wait()
            guard got == n else {
                throw DiskError.io("read \(got) of \(n) bytes at \(offset) of \(image.io.pool)/\(image.name): the volume ends early")
            }
            let bytes = UnsafeRawBufferPointer(rebasing: buffers[b][0..<n])
            // The hashes and the sink's write side by side (as a download does): each is about as long as the other.
            var writeError: Error?
            digests.withUnsafeMutableBufferPointer { ds in
                nonisolated(unsafe) let dp = ds
                nonisolated(unsafe) let raw = bytes
                nonisolated(unsafe) var failure: Error?
                DispatchQueue.concurrentPerform(iterations: dp.count + 1) { i in
                    if i == dp.count {
                        do { try sink.write(raw, at: offset) } catch { failure = error }
                    } else {
                        dp[i].update(raw)
                    }
                }
                writeError = failure
            }
            if let writeError { throw writeError }
            try issue(slot)
            slot = (slot + 1) % depth
        }
        _ = try VerifiedDownload.check(digests, against: expected, imageID: imageID)
    }
}
