import Foundation
import Synchronization

/// A unit of work the agent does for an image.
public struct Job: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable { case fetch, scrub }
    public var id: String
    public var imageID: String
    public var kind: Kind
    public var state: CachedImage.State
    public var bytesDone: UInt64
    public var bytesTotal: UInt64?
    public var error: String?
    public var createdAt: Double
    public var finishedAt: Double?

    enum CodingKeys: String, CodingKey {
        case id, imageID = "image_id", kind, state, bytesDone = "bytes_done", bytesTotal = "bytes_total", error
        case createdAt = "created_at", finishedAt = "finished_at"
    }

    public var finished: Bool { state == .ready || state == .error }

    /// A new job with a fresh id.
    init(imageID: String, kind: Kind, state: CachedImage.State, bytesTotal: UInt64?) {
        self.init(id: UUID().uuidString.lowercased(), imageID: imageID, kind: kind, state: state, bytesDone: 0,
                  bytesTotal: bytesTotal, error: nil, createdAt: Date().timeIntervalSince1970, finishedAt: nil)
    }

    init(id: String, imageID: String, kind: Kind, state: CachedImage.State, bytesDone: UInt64, bytesTotal: UInt64?,
         error: String?, createdAt: Double, finishedAt: Double?) {
        self.id = id
        self.imageID = imageID
        self.kind = kind
        self.state = state
        self.bytesDone = bytesDone
        self.bytesTotal = bytesTotal
        self.error = error
        self.createdAt = createdAt
        self.finishedAt = finishedAt
    }
}

/// Fans job events out to any number of subscribers (the control API's server-sent event streams).
public final class EventHub: Sendable {
    private let subscribers = Mutex<[UUID: AsyncStream<Job>.Continuation]>([:])

    public init() {}

    public func subscribe() -> AsyncStream<Job> {
        let id = UUID()
        let (stream, continuation) = AsyncStream<Job>.makeStream(bufferingPolicy: .bufferingNewest(256))
        continuation.onTermination = { [weak self] _ in
            _ = self?.subscribers.withLock { $0.removeValue(forKey: id) }
        }
        subscribers.withLock { $0[id] = continuation }
        return stream
    }

    public func publish(_ job: Job) {
        let targets = subscribers.withLock { Array($0.values) }
        for c in targets { c.yield(job) }
    }

    public func finishAll() {
        let targets = subscribers.withLock { s in
            let v = Array(s.values)
            s.removeAll()
            return v
        }
        for c in targets { c.finish() }
    }
}

/// Counters for `/metrics`.
public struct CacheMetrics: Sendable {
    public var bytesFetched: UInt64 = 0
    public var hits: UInt64 = 0
    public var misses: UInt64 = 0
    public var evictions: UInt64 = 0
    public var errors: [String: UInt64] = [:]
    public var jobsFinished: UInt64 = 0
    public var jobSeconds: Double = 0
    /// Cumulative counts of job durations under each bound (seconds), Prometheus-style.
    public static let buckets: [Double] = [0.1, 0.5, 1, 5, 15, 60, 300, 1800]
    public var bucketCounts = [UInt64](repeating: 0, count: CacheMetrics.buckets.count)
    public var resumes: UInt64 = 0

    mutating func observe(seconds: Double) {
        jobsFinished += 1
        jobSeconds += seconds
        for (i, b) in Self.buckets.enumerated() where seconds <= b { bucketCounts[i] += 1 }
    }
}
