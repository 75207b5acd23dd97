import AsyncHTTPClient
import Dispatch
import Foundation
import Logging
import NIOCore
import SystemIO

/// Where downloaded bytes go. Called with consecutive blocks, in order, from one background thread at a time.
public protocol DownloadSink: AnyObject, Sendable {
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws
}

/// Retries for a dropped or failed download: exponential backoff from `baseDelay`, capped at `maxDelay`. The count
/// restarts whenever an attempt made progress, so a long download survives many short outages.
public struct RetryPolicy: Sendable {
    public var attempts: Int
    public var baseDelay: Double
    public var maxDelay: Double
    public init(attempts: Int = 5, baseDelay: Double = 0.5, maxDelay: Double = 8) {
        self.attempts = attempts
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
    }
    func delay(_ attempt: Int) -> Double { min(maxDelay, baseDelay * pow(2, Double(max(0, attempt - 1)))) }
}

/// What a verified download produced.
public struct DownloadResult: Sendable {
    public var bytes: UInt64
    /// algorithm → lower-case hex, for every hash computed (and matched, when it had an expected value).
    public var hashes: [String: String]
    /// Connections that were resumed with a Range request.
    public var resumes: Int
    /// Servers that answered a Range request with the whole body (the prefix was skipped).
    public var rangeIgnored: Int

    public init(bytes: UInt64, hashes: [String: String], resumes: Int, rangeIgnored: Int) {
        self.bytes = bytes
        self.hashes = hashes
        self.resumes = resumes
        self.rangeIgnored = rangeIgnored
    }
}

/// Progress callback: bytes received so far.
public typealias DownloadProgress = @Sendable (UInt64) -> Void

/// Streams an image's bytes from Glance into a sink while hashing them with `os_hash_algo` (or, for an image
/// without one, md5 `checksum`) in the same pass. A dropped connection resumes with `Range: bytes=N-`; a server
/// that ignores the Range and sends the whole body is detected (200 instead of 206) and its first N bytes
/// skipped; a store that refuses Range requests (Glance's s3 and http stores answer 400) is read again from the
/// start on every retry, skipping what was received. Nothing is trusted until `run` returns: the caller must not publish the bytes before that.
///
/// The network loop fills 4 MiB blocks; a worker thread writes a block and updates the hash in parallel while
/// the next block is received.
public final class VerifiedDownload: @unchecked Sendable {
    let client: GlanceClient
    public let image: GlanceImage
    let verify: Bool
    let retry: RetryPolicy
    let blockSize: Int
    /// Shared by every download that takes from it (prefetches); nil: not limited.
    let limit: BandwidthLimit?
    let logger: Logger
    let progress: DownloadProgress?

    private var digests: [ImageDigest] = []
    /// One block at a time goes to the sink here (a write may wait: a stream file holds the download back while
    /// it runs ahead of its converter, so this is a queue of its own, never a shared pool's thread).
    private let worker = DispatchQueue(label: "imgconv.download")
    /// The hashes run on the background pool, at background priority, alongside the write.
    private let hashers = WorkerPool.background

    public init(client: GlanceClient, image: GlanceImage, verify: Bool = true, retry: RetryPolicy = RetryPolicy(),
                blockSize: Int = 4 << 20, limit: BandwidthLimit? = nil, progress: DownloadProgress? = nil,
                logger: Logger = Logger(label: "imgconv.download")) {
        self.client = client
        self.image = image
        self.verify = verify
        self.retry = retry
        self.blockSize = blockSize
        self.limit = limit
        self.progress = progress
        self.logger = logger
    }

    /// The hash to compute and the value it must have: `os_hash_value` (multihash, sha512 by default) when Glance
    /// has one, the legacy md5 `checksum` only when it has not, as glanceclient verifies. md5 next to sha512 would
    /// add nothing but CPU (0.4 s per 300 MB, on the cores the conversion needs): a body that matches sha512 can
    /// differ from Glance's md5 only if Glance's own records disagree.
    func expectations() throws -> [(String, String?)] { try Self.expectations(image, verify: verify) }

    /// The hashes to compute over an image's bytes, each with the value Glance recorded (nil: computed for the
    /// record only): `os_hash_algo`/`os_hash_value`, else the md5 `checksum`. With `verify`, an image with neither
    /// is refused.
    /// Compares finished digests (one per `expectations` entry, in order) with Glance's values: the hashes by
    /// algorithm, or `GlanceError.integrity` for the first that differs.
    public static func check(_ digests: [ImageDigest], against expected: [(String, String?)],
                             imageID: String) throws -> [String: String] {
        var hashes: [String: String] = [:]
        for (d, (algo, want)) in zip(digests, expected) {
            let got = d.hex()
            hashes[algo] = got
            if let want, want != got {
                throw GlanceError.integrity(imageID: imageID, algorithm: algo, expected: want, actual: got)
            }
        }
        return hashes
    }

    public static func expectations(_ image: GlanceImage, verify: Bool) throws -> [(String, String?)] {
        var out: [(String, String?)] = []
        if let algo = image.osHashAlgo, let value = image.osHashValue, !algo.isEmpty, !value.isEmpty {
            guard ImageDigest(algorithm: algo) != nil else { throw GlanceError.unsupportedHash(imageID: image.id, algorithm: algo) }
            out.append((algo.lowercased(), value.lowercased()))
        } else if let md5 = image.checksum, !md5.isEmpty {
            out.append(("md5", md5.lowercased()))
        }
        if verify && out.isEmpty {
            throw GlanceError.unsupportedHash(imageID: image.id, algorithm: "none (the image has neither os_hash_value nor checksum)")
        }
        // Nothing to check against: sha512 is still computed, for the record (a later scrub compares with it).
        if out.isEmpty { return [("sha512", nil)] }
        if !verify { return out.map { ($0.0, nil) } }
        return out
    }

    public func run(into sink: any DownloadSink) async throws -> DownloadResult {
        do {
            return try await stream(into: sink)
        } catch let e as SinkFailure {
            throw e.underlying
        }
    }

    /// A write into the sink failed (a full disk, a refused first block): never a reason to download again.
    struct SinkFailure: Error { var underlying: Error }

    private func stream(into sink: any DownloadSink) async throws -> DownloadResult {
        guard image.status == "active" else { throw GlanceError.notActive(imageID: image.id, status: image.status) }
        let expected = try expectations()
        digests = expected.compactMap { ImageDigest(algorithm: $0.0) }

        var received: UInt64 = 0
        var submitted: UInt64 = 0
        var staging = [UInt8]()
        staging.reserveCapacity(blockSize)
        var inFlight: Task<Void, Error>?
        var failures = 0
        var resumes = 0
        var rangeIgnored = 0
        // Glance's s3 and http stores refuse a Range (400 "Getting images randomly from this store is not
        // supported"): once refused, every retry asks for the whole body and skips what was already received.
        var rangeRefused = false

        func submit() async throws {
            if let t = inFlight { try await t.value }
            guard !staging.isEmpty else { inFlight = nil; return }
            let block = staging
            let at = submitted
            submitted += UInt64(block.count)
            staging.removeAll(keepingCapacity: true)
            inFlight = Task { try await self.process(block, at: at, sink: sink) }
        }

        while true {
            var progressed = false
            let attemptStart = received
            do {
                if received > 0 { resumes += 1 }
                let (response, url) = try await client.openFile(image.id, offset: rangeRefused ? 0 : received)
                var skip: UInt64 = 0
                switch response.status.code {
                case let code where received > 0 && !rangeRefused && [400, 416, 501].contains(code):
                    let body = try? await response.body.collect(upTo: 1 << 20)
                    rangeRefused = true
                    logger.warning("the store refused a Range request; downloading again from the start",
                                   metadata: ["image": "\(image.id)", "skip": "\(received)",
                                              "status": "\(response.status.code)", "detail": "\(body.map(GlanceClient.excerpt) ?? "")"])
                    continue
                case 200:
                    skip = received
                    if received > 0 && !rangeRefused {
                        rangeIgnored += 1
                        logger.warning("server ignored Range and sent the whole body; skipping the prefix",
                                       metadata: ["image": "\(image.id)", "skip": "\(skip)"])
                    }
                case 206:
                    guard let cr = response.headers.first(name: "Content-Range"), let start = Self.rangeStart(cr), start == received else {
                        throw GlanceError.malformedResponse(url: url, detail: "206 with Content-Range \(response.headers.first(name: "Content-Range") ?? "-") for a request from \(received)")
                    }
                case 204:
                    throw GlanceError.notActive(imageID: image.id, status: "without data (204)")
                case 404:
                    throw GlanceError.imageNotFound(image.id)
                case 500...599, 429:
                    throw Retryable(detail: "HTTP \(response.status.code)")
                default:
                    let body = try? await response.body.collect(upTo: 1 << 20)
                    throw GlanceError.http(method: "GET", url: url, status: Int(response.status.code),
                                           detail: body.map(GlanceClient.excerpt) ?? "")
                }
                for try await var buffer in response.body {
                    if skip > 0 {
                        let n = Int(min(skip, UInt64(buffer.readableBytes)))
                        buffer.moveReaderIndex(forwardBy: n)
                        skip -= UInt64(n)
                        if buffer.readableBytes == 0 { continue }
                    }
                    received += UInt64(buffer.readableBytes)
                    // Only real progress restarts the retry count: a server that dribbles a few bytes per
                    // connection must still run out of attempts.
                    progressed = received - attemptStart >= Self.meaningfulProgress
                    if let size = image.size, received > size {
                        throw GlanceError.sizeMismatch(imageID: image.id, expected: size, actual: received)
                    }
                    buffer.withUnsafeReadableBytes { staging.append(contentsOf: $0) }
                    if staging.count >= blockSize {
                        let n = staging.count
                        try await submit()
                        progress?(received)
                        try await limit?.take(n)
                    }
                }
                if let size = image.size, received < size {
                    throw Retryable(detail: "connection closed after \(received) of \(size) bytes")
                }
                break
            } catch let e as GlanceError {
                if case .transport = e {} else { throw e }
                try await backoff(&failures, progressed: progressed, detail: e.description)
            } catch let e as Retryable {
                try await backoff(&failures, progressed: progressed, detail: e.detail)
            } catch is CancellationError {
                throw CancellationError()
            } catch let e as SinkFailure {
                throw e
            } catch {
                // Body stream errors (connection reset, read timeout) from AsyncHTTPClient or NIO.
                try await backoff(&failures, progressed: progressed, detail: "\(error)")
            }
        }
        // The last block pays for its bytes too (uncharged, a prefetch of many small images ran above the limit).
        let last = staging.count
        try await submit()
        if let t = inFlight { try await t.value }
        progress?(received)
        try await limit?.take(last)

        let hashes = try Self.check(digests, against: expected, imageID: image.id)
        return DownloadResult(bytes: received, hashes: hashes, resumes: resumes, rangeIgnored: rangeIgnored)
    }

    struct Retryable: Error { var detail: String }

    /// Bytes an attempt must deliver before its failure counts as a fresh start.
    static let meaningfulProgress: UInt64 = 1 << 20

    private func backoff(_ failures: inout Int, progressed: Bool, detail: String) async throws {
        if progressed { failures = 0 }
        failures += 1
        if failures > retry.attempts {
            throw GlanceError.transport(url: "/v2/images/\(image.id)/file", attempts: failures, detail: detail)
        }
        let d = retry.delay(failures)
        logger.warning("download interrupted; resuming", metadata: ["image": "\(image.id)", "attempt": "\(failures)",
                                                                   "delay": "\(d)", "reason": "\(detail)"])
        try await Task.sleep(nanoseconds: UInt64(d * 1e9))
    }

    /// Writes one block (on the download's queue) while every digest is fed (on the background pool).
    private func process(_ block: [UInt8], at offset: UInt64, sink: any DownloadSink) async throws {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
            worker.async {
                var writeError: Error?
                block.withUnsafeBytes { rawBlock in
                    self.digests.withUnsafeMutableBufferPointer { ds in
                        nonisolated(unsafe) let dp = ds
                        nonisolated(unsafe) let raw = rawBlock
                        self.hashers.concurrentPerform(iterations: ds.count, width: ds.count + 1, first: {
                            do { try sink.write(raw, at: offset) } catch { writeError = error }
                        }) { i in
                            dp[i].update(raw)
                        }
                    }
                }
                if let writeError { c.resume(throwing: SinkFailure(underlying: writeError)) } else { c.resume() }
            }
        }
    }

    /// `bytes S-E/T` → S.
    static func rangeStart(_ s: String) -> UInt64? {
        let t = s.trimmingCharacters(in: .whitespaces)
        guard t.hasPrefix("bytes ") else { return nil }
        let rest = t.dropFirst(6)
        guard let dash = rest.firstIndex(of: "-") else { return nil }
        return UInt64(rest[..<dash])
    }
}
