import Foundation
import Synchronization

/// A unit of work the agent does for an image: a fetch, a scrub, a boot disk.
public struct Job: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable { case fetch, scrub, disk }
    public enum State: String, Codable, Sendable {
        case queued, fetching, verifying, converting, building, ready, error, cancelled
    }
    public var id: String
    public var imageID: String
    public var kind: Kind
    public var state: State
    /// For a disk job: the disk it makes.
    public var disk: String?
    public var bytesDone: UInt64
    public var bytesTotal: UInt64?
    public var error: String?
    public var createdAt: Double
    public var finishedAt: Double?

    enum CodingKeys: String, CodingKey {
        case id, imageID = "image_id", kind, state, disk, bytesDone = "bytes_done", bytesTotal = "bytes_total", error
        case createdAt = "created_at", finishedAt = "finished_at"
    }

    public var finished: Bool { state == .ready || state == .error || state == .cancelled }

    /// A new job with a fresh id.
    public init(imageID: String, kind: Kind, state: State, bytesTotal: UInt64? = nil, disk: String? = nil) {
        self.init(id: UUID().uuidString.lowercased(), imageID: imageID, kind: kind, state: state, bytesDone: 0,
                  bytesTotal: bytesTotal, error: nil, createdAt: Date().timeIntervalSince1970, finishedAt: nil)
        self.disk = disk
    }

    init(id: String, imageID: String, kind: Kind, state: State, bytesDone: UInt64, bytesTotal: UInt64?,
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

extension Job.State {
    /// The job state of a cache row's state.
    init(_ s: CachedImage.State) {
        switch s {
        case .queued: self = .queued
        case .fetching: self = .fetching
        case .verifying: self = .verifying
        case .converting: self = .converting
        case .ready: self = .ready
        case .error, .missing: self = .error
        }
    }
}

/// Every job the agent runs or ran (the last `history` of them), shared by the cache and the disk service, and
/// published to the event streams as it changes. Readable without an actor hop (`GET /v1/jobs` never waits for a
/// busy cache).
public final class JobBook: Sendable {
    private struct State {
        var jobs: [String: Job] = [:]
        var order: [String] = []
    }
    private let state = Mutex(State())
    public let events = EventHub()
    let history: Int

    public init(history: Int = 500) { self.history = history }

    /// Records a new job or a change to one, and publishes it.
    public func record(_ job: Job) {
        state.withLock { s in
            if s.jobs[job.id] == nil {
                s.order.append(job.id)
                if s.order.count > history {
                    let drop = s.order.removeFirst()
                    s.jobs[drop] = nil
                }
            }
            s.jobs[job.id] = job
        }
        events.publish(job)
    }

    /// Changes a job (no-op for one that is gone) and returns it.
    @discardableResult
    public func update(_ id: String, _ change: (inout Job) -> Void) -> Job? {
        guard var j = state.withLock({ $0.jobs[id] }) else { return nil }
        change(&j)
        if j.finished && j.finishedAt == nil { j.finishedAt = Date().timeIntervalSince1970 }
        record(j)
        return j
    }

    public func job(_ id: String) -> Job? { state.withLock { $0.jobs[id] } }
    public func all() -> [Job] { state.withLock { s in s.order.compactMap { s.jobs[$0] } } }
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
