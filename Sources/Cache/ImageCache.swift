import SystemIO
import Convert
import Crypto
import Foundation
import Glance
import ImageFormats
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// How the cache lays out and limits itself (`[cache]` in the agent config).
public struct CacheConfig: Sendable {
    public enum Layout: String, Sendable { case nova, id }
    public var directory: String
    /// Where the SQLite index lives.
    public var indexPath: String
    /// Hard limit on the bytes the cached files occupy.
    public var maxSize: UInt64
    /// Keep at least this much free on the cache's file system.
    public var minFree: UInt64
    public var layout: Layout
    /// Convert to raw on arrival (Nova's force_raw_images).
    public var forceRaw: Bool

    public init(directory: String, indexPath: String? = nil, maxSize: UInt64 = 50 << 30, minFree: UInt64 = 0,
                layout: Layout = .nova, forceRaw: Bool = false) {
        self.directory = directory
        self.indexPath = indexPath ?? directory + "/.imgconv-index.sqlite"
        self.maxSize = maxSize
        self.minFree = minFree
        self.layout = layout
        self.forceRaw = forceRaw
    }

    /// The file name of an image: Nova's `_base` names files sha1(image_id); `id` uses the id itself. The id is
    /// checked to be a UUID before it gets here, so no path is built from unchecked input.
    public func fileName(for id: String) -> String {
        switch layout {
        case .id: return id
        case .nova: return Insecure.SHA1.hash(data: Array(id.utf8)).map { String(format: "%02x", $0) }.joined()
        }
    }
}

/// What `ensure` found: the image ready, or the job that is fetching it.
public enum EnsureResult: Sendable {
    case ready(CachedImage)
    case pending(Job)
}

/// The node's image cache: verified Glance images on local disk.
///
/// - Single flight: one fetch per image however many callers ask; every waiter gets its result.
/// - A file is published (renamed to its final name, marked ready) only after its hashes matched and the
///   inspection found it safe; until then it lives under a temporary name that start-up removes.
/// - LRU eviction under `maxSize` and `minFree`, never of pinned or in-use (leased) images.
public actor ImageCache {
    public nonisolated let config: CacheConfig
    let index: CacheIndex
    let source: any ImageSource
    let logger: Logger
    public nonisolated let events = EventHub()

    private var lookups: [String: Task<GlanceImage, Error>] = [:]
    private var inflight: [String: (job: String, task: Task<CachedImage, Error>)] = [:]
    private var jobs: [String: Job] = [:]
    private var jobOrder: [String] = []
    private var reserved: [String: UInt64] = [:]
    private var leases: [String: Int] = [:]
    public private(set) var metrics = CacheMetrics()
    /// Jobs kept for `GET /v1/jobs` after they finish.
    let jobHistory = 500

    public init(config: CacheConfig, source: any ImageSource, logger: Logger = Logger(label: "imgconv.cache")) throws {
        try FileSystem.makeDirectory(config.directory)
        if let slash = config.indexPath.lastIndex(of: "/") { try FileSystem.makeDirectory(String(config.indexPath[..<slash])) }
        self.config = config
        self.source = source
        self.logger = logger
        do {
            index = try CacheIndex(path: config.indexPath)
        } catch {
            throw CacheError.io("cannot open the cache index '\(config.indexPath)': \(error)")
        }
        try Self.reconcile(config: config, index: index, logger: logger)
    }

    // MARK: start-up

    /// Removes temporary files a killed agent left, forgets rows that never became ready, and drops rows whose
    /// file is gone or has the wrong size. Files the index does not know are left alone (they may be Nova's).
    static func reconcile(config: CacheConfig, index: CacheIndex, logger: Logger) throws {
        for name in FileSystem.list(config.directory) where name.hasPrefix(".") && name.contains(".imgconv-") && !name.hasPrefix(".imgconv-index") {
            unlink(config.directory + "/" + name)
            logger.notice("removed an orphaned temporary file", metadata: ["file": "\(name)"])
        }
        for row in try index.all() {
            let path = config.directory + "/" + config.fileName(for: row.id)
            guard row.state == .ready else {
                try index.remove(row.id)
                logger.notice("forgot an image whose fetch was interrupted", metadata: ["image": "\(row.id)", "state": "\(row.state)"])
                continue
            }
            let size = FileSystem.fileSize(path)
            if size == nil || (row.storedAsDownloaded && row.size != nil && size != row.size) {
                try index.remove(row.id)
                if size != nil { unlink(path) }
                logger.warning("dropped an index entry whose file is missing or has the wrong size", metadata: ["image": "\(row.id)"])
            }
        }
    }

    // MARK: queries

    public func image(_ id: String) throws -> CachedImage? {
        guard ImageID.isValid(id) else { throw CacheError.invalidID(id) }
        var row = try index.get(id)
        if let j = inflight[id].flatMap({ jobs[$0.job] }), row != nil {
            row!.bytesDone = j.bytesDone
        }
        return row
    }

    public func images() throws -> [CachedImage] { try index.all() }
    public func job(_ id: String) -> Job? { jobs[id] }
    public func allJobs() -> [Job] { jobOrder.compactMap { jobs[$0] } }
    public func usedBytes() throws -> UInt64 { try index.totalDiskBytes() }

    // MARK: ensure / wait

    /// Makes sure the image is cached: ready now, or a fetch job (started or joined). Glance is asked for the
    /// image first (one request however many callers ask), so an unknown or unsupported image fails here.
    /// `throttled` fetches (prefetch) honour the configured bandwidth limit; on-demand ones do not.
    public func ensure(_ id: String, throttled: Bool = false) async throws -> EnsureResult {
        guard ImageID.isValid(id) else { throw CacheError.invalidID(id) }
        if let r = try current(id) { return r }
        let lookup: Task<GlanceImage, Error>
        if let l = lookups[id] {
            lookup = l
        } else {
            let source = self.source
            lookup = Task { try await source.show(id) }
            lookups[id] = lookup
        }
        let answer = await lookup.result
        lookups[id] = nil
        let image: GlanceImage
        do {
            image = try answer.get()
        } catch let e as GlanceError {
            throw CacheError.upstream(e)
        }
        guard let declared = CacheError.declaredFormat(diskFormat: image.diskFormat, containerFormat: image.containerFormat) else {
            throw CacheError.unsupportedFormat(id: id, diskFormat: image.diskFormat ?? "none", containerFormat: image.containerFormat ?? "none")
        }
        guard image.status == "active" else { throw CacheError.upstream(.notActive(imageID: id, status: image.status)) }
        // Another caller may have started the fetch while Glance answered.
        if let r = try current(id) { return r }
        metrics.misses += 1
        return .pending(start(image, declared: declared, throttled: throttled))
    }

    /// The image if ready (a hit), or its running job.
    private func current(_ id: String) throws -> EnsureResult? {
        if let f = inflight[id], let j = jobs[f.job] { return .pending(j) }
        if var row = try index.get(id), row.state == .ready, let p = row.path, FileSystem.exists(p) {
            metrics.hits += 1
            row.lastUsed = Date().timeIntervalSince1970
            try index.save(row)
            return .ready(row)
        }
        return nil
    }

    /// Ensures and waits: the ready image, or the error of its fetch.
    public func fetch(_ id: String, throttled: Bool = false) async throws -> CachedImage {
        switch try await ensure(id, throttled: throttled) {
        case let .ready(r): return r
        case let .pending(job):
            if let f = inflight[id], f.job == job.id { return try await f.task.value }
            // It finished between our ensure and now: read the outcome.
            if let row = try index.get(id), row.state == .ready { return row }
            throw CacheError.io(jobs[job.id]?.error ?? "the fetch of \(id) ended without a result")
        }
    }

    /// Fetches if needed and marks the image in use until `release`: it is not evicted meanwhile.
    public func acquire(_ id: String) async throws -> CachedImage {
        leases[id, default: 0] += 1
        do {
            var row = try await fetch(id)
            row.useCount += 1
            row.lastUsed = Date().timeIntervalSince1970
            try index.save(row)
            return row
        } catch {
            release(id)
            throw error
        }
    }

    public func release(_ id: String) {
        if let n = leases[id] { leases[id] = n > 1 ? n - 1 : nil }
    }

    private func start(_ image: GlanceImage, declared: ImageFormat, throttled: Bool) -> Job {
        let id = image.id
        let job = Job(imageID: id, kind: .fetch, state: .queued, bytesTotal: nil)
        record(job)
        let task = Task { try await self.run(job.id, image, declared, throttled) }
        inflight[id] = (job.id, task)
        return job
    }

    private func record(_ job: Job) {
        if jobs[job.id] == nil {
            jobOrder.append(job.id)
            if jobOrder.count > jobHistory {
                let drop = jobOrder.removeFirst()
                jobs[drop] = nil
            }
        }
        jobs[job.id] = job
        events.publish(job)
    }

    private func update(_ jobID: String, _ change: (inout Job) -> Void) {
        guard var j = jobs[jobID] else { return }
        change(&j)
        record(j)
    }

    func progress(_ jobID: String, _ bytes: UInt64) {
        guard var j = jobs[jobID], !j.finished else { return }
        metrics.bytesFetched += bytes - min(bytes, j.bytesDone)
        j.bytesDone = bytes
        record(j)
    }

    private func run(_ jobID: String, _ image: GlanceImage, _ declared: ImageFormat, _ throttled: Bool) async throws -> CachedImage {
        let started = Date()
        let id = image.id
        do {
            let row = try await fetchAndStore(jobID, image, declared, throttled)
            update(jobID) { $0.state = .ready; $0.bytesDone = row.bytesDone; $0.finishedAt = Date().timeIntervalSince1970 }
            finish(id, started: started, error: nil)
            return row
        } catch {
            let message = "\(error)"
            update(jobID) { $0.state = .error; $0.error = message; $0.finishedAt = Date().timeIntervalSince1970 }
            if var row = try? index.get(id), row.state != .ready {
                row.state = .error
                row.error = message
                row.path = nil
                try? index.save(row)
            }
            finish(id, started: started, error: error)
            logger.error("fetch failed", metadata: ["image": "\(id)", "error": "\(message)"])
            throw error
        }
    }

    private func finish(_ id: String, started: Date, error: Error?) {
        inflight[id] = nil
        reserved[id] = nil
        metrics.observe(seconds: Date().timeIntervalSince(started))
        if let error {
            let kind: String
            switch error {
            case CacheError.unsafe: kind = "unsafe"
            case CacheError.noRoom: kind = "no_room"
            case CacheError.upstream(.integrity), GlanceError.integrity: kind = "integrity"
            case CacheError.io: kind = "io"
            default: kind = "upstream"
            }
            metrics.errors[kind, default: 0] += 1
        }
    }

    private func setState(_ jobID: String, _ row: inout CachedImage, _ state: CachedImage.State) throws {
        row.state = state
        try index.save(row)
        update(jobID) { $0.state = state }
    }

    private func fetchAndStore(_ jobID: String, _ image: GlanceImage, _ declared: ImageFormat, _ throttled: Bool) async throws -> CachedImage {
        let id = image.id
        var row = (try? index.get(id)) ?? CachedImage(id: id, diskFormat: image.diskFormat ?? "raw")
        row.name = image.name
        row.diskFormat = image.diskFormat ?? "raw"
        row.size = image.size
        row.virtualSize = image.virtualSize
        row.osHashAlgo = image.osHashAlgo
        row.osHashValue = image.osHashValue
        row.checksum = image.checksum
        row.bytesDone = 0
        row.bytesTotal = image.size
        row.error = nil
        row.path = nil
        row.diskBytes = 0
        update(jobID) { $0.bytesTotal = image.size }
        try setState(jobID, &row, .fetching)

        try makeRoom(for: id, bytes: image.size ?? 0)
        let finalPath = config.directory + "/" + config.fileName(for: id)
        let file = OutputFile(path: finalPath)
        do { try file.create() } catch { throw CacheError.io("\(error)") }
        defer { file.discard() }
        let sink = FileDownloadSink(file: file, declared: declared, imageID: id)
        let result: DownloadResult
        do {
            result = try await source.download(image, into: sink, throttled: throttled, progress: { [weak self] n in
                guard let self else { return }
                Task { await self.progress(jobID, n) }
            })
        } catch let e as GlanceError {
            throw CacheError.upstream(e)
        }
        metrics.resumes += UInt64(result.resumes)
        progress(jobID, result.bytes)
        row.bytesDone = result.bytes
        try setState(jobID, &row, .verifying)

        // The whole image is here and its hashes matched: inspect it before anything else reads it.
        guard let tmp = file.temporaryPath else { throw CacheError.io("the download of \(id) has no temporary file") }
        // It walks every table: off the actor, so the control API keeps answering meanwhile.
        let (verdict, opened) = try await offload { ImageInspector.inspect(path: tmp, declared: declared) }
        guard verdict.safe, let opened else { throw CacheError.unsafe(id: id, reasons: verdict.reasons.map(\.description)) }
        row.virtualSize = opened.virtualSize

        if config.forceRaw && declared != .raw {
            try setState(jobID, &row, .converting)
            let dataBytes = try await offload {
                (try? opened.allExtents().filter { $0.status == .data }.reduce(UInt64(0)) { $0 + $1.length }) ?? opened.virtualSize
            }
            try makeRoom(for: id, bytes: (reserved[id] ?? 0) + dataBytes)
            try await offload {
                let out = RawFileSink(path: finalPath)
                do {
                    _ = try Converter().convert(opened, to: out)
                } catch {
                    throw CacheError.io("converting \(id) to raw: \(error)")
                }
            }
            file.discard()
            row.storedFormat = ImageFormat.raw.rawValue
        } else {
            do { try file.commit() } catch { throw CacheError.io("\(error)") }
            row.storedFormat = declared.rawValue
        }
        row.path = finalPath
        row.diskBytes = FileSystem.allocatedBytes(finalPath) ?? result.bytes
        row.verifiedAt = Date().timeIntervalSince1970
        row.lastUsed = Date().timeIntervalSince1970
        row.bytesDone = result.bytes
        try setState(jobID, &row, .ready)
        logger.info("image cached", metadata: ["image": "\(id)", "bytes": "\(result.bytes)", "path": "\(finalPath)"])
        return row
    }

    // MARK: space

    /// Reserves `bytes` for an image's fetch, evicting least recently used images if needed.
    func makeRoom(for id: String, bytes: UInt64) throws {
        let others = reserved.filter { $0.key != id }.values.reduce(0, +)
        func used() throws -> UInt64 { try index.totalDiskBytes() + others }
        func fits() throws -> Bool {
            let u = try used()
            guard u + bytes <= config.maxSize else { return false }
            if config.minFree > 0, let free = FileSystem.freeBytes(config.directory) {
                let pending = (reserved[id] ?? 0) < bytes ? bytes - (reserved[id] ?? 0) : 0
                return free >= pending + config.minFree
            }
            return true
        }
        var candidates = try index.evictionOrder().filter { !$0.pinned && (leases[$0.id] ?? 0) == 0 && $0.id != id && inflight[$0.id] == nil }
        while try !fits() {
            guard !candidates.isEmpty else {
                let available = config.maxSize > (try used()) ? config.maxSize - (try used()) : 0
                throw CacheError.noRoom(id: id, needed: bytes, available: available)
            }
            let victim = candidates.removeFirst()
            try removeFiles(victim)
            metrics.evictions += 1
            logger.notice("evicted", metadata: ["image": "\(victim.id)", "bytes": "\(victim.diskBytes)"])
        }
        reserved[id] = bytes
    }

    private func removeFiles(_ row: CachedImage) throws {
        if let p = row.path { unlink(p) }
        try index.remove(row.id)
    }

    // MARK: operator actions

    /// Removes an image from the cache; refuses while it is pinned, in use or being fetched.
    public func evict(_ id: String) throws {
        guard ImageID.isValid(id) else { throw CacheError.invalidID(id) }
        guard let row = try index.get(id) else { throw CacheError.notCached(id) }
        if inflight[id] != nil { throw CacheError.busy(id: id, why: "being fetched") }
        if row.pinned { throw CacheError.busy(id: id, why: "pinned (unpin it first)") }
        if (leases[id] ?? 0) > 0 { throw CacheError.busy(id: id, why: "in use") }
        try removeFiles(row)
        metrics.evictions += 1
    }

    public func setPinned(_ id: String, _ pinned: Bool) throws -> CachedImage {
        guard ImageID.isValid(id) else { throw CacheError.invalidID(id) }
        guard var row = try index.get(id) else { throw CacheError.notCached(id) }
        row.pinned = pinned
        try index.save(row)
        return row
    }

    /// Re-verifies ready images against the hashes Glance recorded (images stored as downloaded), or re-inspects
    /// them (converted images). A file that fails is removed and the image marked error.
    public func scrub(_ ids: [String]? = nil) async throws -> [(id: String, ok: Bool, detail: String)] {
        var out: [(String, Bool, String)] = []
        let rows = try index.all().filter { $0.state == .ready && (ids == nil || ids!.contains($0.id)) }
        for row in rows {
            guard let path = row.path else { continue }
            let job = Job(imageID: row.id, kind: .scrub, state: .verifying, bytesTotal: row.diskBytes)
            record(job)
            let asDownloaded = row.storedAsDownloaded
            let result: (Bool, String) = try await offload {
                if asDownloaded {
                    let (algo, want) = row.osHashValue != nil ? (row.osHashAlgo ?? "sha512", row.osHashValue!) : ("md5", row.checksum ?? "")
                    let got = try FileHasher.hash(path, algorithm: algo, token: CancellationToken())
                    return got == want.lowercased() ? (true, "\(algo) matches") : (false, "\(algo) is \(got), Glance recorded \(want)")
                }
                let (v, _) = ImageInspector.inspect(path: path, declared: .raw)
                return v.safe ? (true, "inspection clean") : (false, v.reasons.map(\.description).joined(separator: "; "))
            }
            if !result.0 {
                unlink(path)
                var r = row
                r.state = .error
                r.error = "scrub: \(result.1); the file was removed"
                r.path = nil
                r.diskBytes = 0
                try index.save(r)
                metrics.errors["scrub", default: 0] += 1
                logger.error("scrub found a corrupt image", metadata: ["image": "\(row.id)", "detail": "\(result.1)"])
            } else {
                var r = row
                r.verifiedAt = Date().timeIntervalSince1970
                try index.save(r)
            }
            update(job.id) { $0.state = result.0 ? .ready : .error; $0.error = result.0 ? nil : result.1
                $0.finishedAt = Date().timeIntervalSince1970; $0.bytesDone = row.diskBytes }
            out.append((row.id, result.0, result.1))
        }
        return out
    }

    /// Cancels running fetches (their temporary files are removed) and waits for them: graceful shutdown.
    public func shutdown() async {
        let tasks = inflight.values.map(\.task)
        for t in tasks { t.cancel() }
        for t in tasks { _ = try? await t.value }
        events.finishAll()
    }
}
