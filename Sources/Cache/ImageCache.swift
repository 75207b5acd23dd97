import Convert
import Crypto
import Foundation
import Glance
import ImageFormats
import Logging
import SystemIO

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
    /// Permission bits of cached files (qemu reads them as another user) and of the directory.
    public var fileMode: mode_t = 0o644
    public var directoryMode: mode_t = 0o755

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
    /// canonical (a lower-case UUID) before it gets here, so no path is built from unchecked input.
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
/// The actor holds the state that decides (single flight, reservations, leases, pins); the work is elsewhere and
/// never blocks it: `CacheCatalog` (the index, in memory, persisted on its own thread), `Fetcher` (download,
/// inspection, force_raw, publication, all on the executor), `EvictionPlan` (which files go), `Scrubber`
/// (re-verification), `JobBook` (jobs and their events).
///
/// - Single flight: one fetch per image however many callers ask; every waiter gets its result.
/// - A file is published (renamed to its final name, marked ready) only after its hashes matched and the
///   inspection found it safe; until then it lives under a temporary name that start-up removes.
/// - LRU eviction under `maxSize` and `minFree`, never of pinned or in-use (leased) images.
/// - Image ids are canonical (lower-case UUIDs); the edges (control API, config) normalise them.
public actor ImageCache {
    public nonisolated let config: CacheConfig
    let catalog: CacheCatalog
    let fetcher: Fetcher
    let logger: Logger
    /// Jobs of the cache, and of whoever else shares the book (the disk service).
    public nonisolated let jobs: JobBook
    public nonisolated var events: EventHub { jobs.events }

    private var lookups: [String: Task<GlanceImage, Error>] = [:]
    private var inflight: [String: (job: String, task: Task<CachedImage, Error>)] = [:]
    private var reserved: [String: UInt64] = [:]
    private var leases: [String: Int] = [:]
    /// Files of evicted images still being unlinked: a new fetch of the same image waits before it publishes.
    private var removals: [String: Task<Void, Never>] = [:]
    private var scrubs: [UUID: Task<[(id: String, ok: Bool, detail: String)], Error>] = [:]
    public private(set) var metrics = CacheMetrics()

    /// Opens the cache (blocking: directory, SQLite, start-up reconciliation). The agent calls `open`, which runs
    /// this on the executor.
    public init(config: CacheConfig, source: any ImageSource, jobs: JobBook = JobBook(),
                logger: Logger = Logger(label: "imgconv.cache")) throws {
        do {
            try FileSystem.makeDirectory(config.directory, mode: config.directoryMode)
            if let slash = config.indexPath.lastIndex(of: "/") {
                try FileSystem.makeDirectory(String(config.indexPath[..<slash]), mode: 0o700)
            }
        } catch {
            throw CacheError.io("cannot create the cache directory: \(error)")
        }
        self.config = config
        self.logger = logger
        self.jobs = jobs
        fetcher = Fetcher(config: config, source: source, logger: logger)
        do {
            let store = try CacheIndex(path: config.indexPath)
            try Self.reconcile(config: config, index: store, logger: logger)
            catalog = try CacheCatalog(store: store, logger: logger)
        } catch let e as CacheError {
            throw e
        } catch {
            throw CacheError.io("cannot open the cache index '\(config.indexPath)': \(error)")
        }
    }

    /// `init` on the executor, so start-up blocks no thread of the cooperative pool.
    public static func open(config: CacheConfig, source: any ImageSource, jobs: JobBook = JobBook(),
                            logger: Logger = Logger(label: "imgconv.cache")) async throws -> ImageCache {
        try await offload { try ImageCache(config: config, source: source, jobs: jobs, logger: logger) }
    }

    // MARK: start-up

    /// Removes temporary files a killed agent left, forgets rows that never became ready, and drops rows whose
    /// file is gone or has the wrong size; a pinned image whose file is gone stays, `missing`, so that it is
    /// fetched again. Files the index does not know are left alone (they may be Nova's).
    static func reconcile(config: CacheConfig, index: CacheIndex, logger: Logger) throws {
        for name in FileSystem.list(config.directory) where isTemporary(name) {
            unlink(config.directory + "/" + name)
            logger.notice("removed an orphaned temporary file", metadata: ["file": "\(name)"])
        }
        for row in try index.all() {
            let path = config.directory + "/" + config.fileName(for: row.id)
            if row.state == .missing && row.pinned { continue }
            guard row.state == .ready else {
                try index.remove(row.id)
                logger.notice("forgot an image whose fetch was interrupted", metadata: ["image": "\(row.id)", "state": "\(row.state)"])
                continue
            }
            let size = FileSystem.fileSize(path)
            if size == nil && row.pinned {
                var missing = row
                missing.state = .missing
                missing.path = nil
                missing.diskBytes = 0
                missing.error = "the file disappeared while the agent was stopped; it is fetched again"
                try index.save(missing)
                logger.warning("a pinned image's file is missing; it will be fetched again", metadata: ["image": "\(row.id)"])
            } else if size == nil || (row.storedAsDownloaded && row.size != nil && size != row.size) {
                try index.remove(row.id)
                if size != nil { unlink(path) }
                logger.warning("dropped an index entry whose file is missing or has the wrong size", metadata: ["image": "\(row.id)"])
            }
        }
    }

    /// The names OutputFile gives unpublished files (`.<name>.imgconv-<pid>-<n>`), never the index's.
    static func isTemporary(_ name: String) -> Bool {
        name.hasPrefix(".") && name.contains(".imgconv-") && !name.hasPrefix(".imgconv-index")
    }

    // MARK: queries (never block: the catalog is in memory)

    public func image(_ id: String) throws -> CachedImage? {
        try Self.check(id)
        var row = catalog.get(id)
        if let j = inflight[id].flatMap({ jobs.job($0.job) }), row != nil {
            row!.bytesDone = j.bytesDone
        }
        return row
    }

    public nonisolated func images() -> [CachedImage] { catalog.all() }
    public nonisolated func job(_ id: String) -> Job? { jobs.job(id) }
    public nonisolated func allJobs() -> [Job] { jobs.all() }
    /// Bytes the cached files occupy; answers without waiting for the actor (the health check).
    public nonisolated func usedBytes() -> UInt64 { catalog.totalDiskBytes() }

    static func check(_ id: String) throws {
        guard ImageID.isCanonical(id) else { throw CacheError.invalidID(id) }
    }

    // MARK: ensure / wait

    /// Makes sure the image is cached: ready now, or a fetch job (started or joined). Glance is asked for the
    /// image first (one request however many callers ask), so an unknown or unsupported image fails here.
    /// `throttled` fetches (prefetch) honour the configured bandwidth limit; on-demand ones do not.
    public func ensure(_ id: String, throttled: Bool = false) async throws -> EnsureResult {
        try Self.check(id)
        if let r = current(id) {
            // A hit is served only while its file is there (a stat, off the actor).
            guard case let .ready(row) = r, let path = row.path else { return r }
            let here: Bool? = try? await offload { FileSystem.exists(path) }
            if here ?? true { return r }
            await checkFiles([id])
            if let r = current(id) { return r }
        }
        let lookup: Task<GlanceImage, Error>
        if let l = lookups[id] {
            lookup = l
        } else {
            let source = fetcher.source
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
        if let r = current(id) { return r }
        metrics.misses += 1
        return .pending(start(image, declared: declared, throttled: throttled))
    }

    /// The image if ready (a hit), or its running job.
    private func current(_ id: String) -> EnsureResult? {
        if let f = inflight[id], let j = jobs.job(f.job) { return .pending(j) }
        if var row = catalog.get(id), row.state == .ready, row.path != nil {
            metrics.hits += 1
            row.lastUsed = Date().timeIntervalSince1970
            catalog.save(row)
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
            if let row = catalog.get(id), row.state == .ready { return row }
            throw CacheError.io(jobs.job(job.id)?.error ?? "the fetch of \(id) ended without a result")
        }
    }

    /// Fetches if needed and marks the image in use until `release`: it is not evicted meanwhile.
    public func acquire(_ id: String) async throws -> CachedImage {
        leases[id, default: 0] += 1
        do {
            var row = try await fetch(id)
            row.useCount += 1
            row.lastUsed = Date().timeIntervalSince1970
            catalog.save(row)
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
        let job = Job(imageID: id, kind: .fetch, state: .queued, bytesTotal: image.size)
        jobs.record(job)
        let task = Task { try await self.run(job.id, image, declared, throttled) }
        inflight[id] = (job.id, task)
        return job
    }

    func progress(_ jobID: String, _ bytes: UInt64) {
        guard let j = jobs.job(jobID), !j.finished else { return }
        metrics.bytesFetched += bytes - min(bytes, j.bytesDone)
        jobs.update(jobID) { $0.bytesDone = bytes }
    }

    private func run(_ jobID: String, _ image: GlanceImage, _ declared: ImageFormat, _ throttled: Bool) async throws -> CachedImage {
        let started = Date()
        let id = image.id
        do {
            let row = try await fetchAndStore(jobID, image, declared, throttled)
            jobs.update(jobID) { $0.state = .ready; $0.bytesDone = row.bytesDone }
            finish(id, started: started, error: nil)
            return row
        } catch {
            let cancelled = error is CancellationError
            let message = cancelled ? "cancelled (the agent is stopping)" : "\(error)"
            jobs.update(jobID) { $0.state = cancelled ? .cancelled : .error; $0.error = message }
            if var row = catalog.get(id), row.state != .ready {
                if cancelled {
                    catalog.remove(id)
                } else {
                    row.state = .error
                    row.error = message
                    row.path = nil
                    catalog.save(row)
                }
            }
            finish(id, started: started, error: cancelled ? nil : error)
            if !cancelled { logger.error("fetch failed", metadata: ["image": "\(id)", "error": "\(message)"]) }
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

    private func setState(_ jobID: String, _ row: inout CachedImage, _ state: CachedImage.State) {
        row.state = state
        catalog.save(row)
        jobs.update(jobID) { $0.state = Job.State(state) }
    }

    private func fetchAndStore(_ jobID: String, _ image: GlanceImage, _ declared: ImageFormat, _ throttled: Bool) async throws -> CachedImage {
        let id = image.id
        var row = catalog.get(id) ?? CachedImage(id: id, diskFormat: image.diskFormat ?? "raw")
        row.name = image.name
        row.diskFormat = image.diskFormat ?? "raw"
        row.size = image.size
        row.virtualSize = image.virtualSize
        row.osHashAlgo = image.osHashAlgo
        row.osHashValue = image.osHashValue
        row.checksum = image.checksum
        row.stores = image.stores.isEmpty ? nil : image.stores
        row.bytesDone = 0
        row.bytesTotal = image.size
        row.error = nil
        row.path = nil
        row.diskBytes = 0
        setState(jobID, &row, .fetching)

        try await makeRoom(for: id, bytes: image.size ?? 0)
        let fetched = try await fetcher.download(image, declared: declared, throttled: throttled, progress: { [weak self] n in
            guard let self else { return }
            Task { await self.progress(jobID, n) }
        }, verifying: { [weak self] in await self?.verifying(jobID, id) })
        let result = fetched.download
        metrics.resumes += UInt64(result.resumes)
        progress(jobID, result.bytes)
        row = catalog.get(id) ?? row
        row.bytesDone = result.bytes
        row.virtualSize = fetched.image.virtualSize
        // What a scrub compares with when Glance has no hash: Glance's algorithm when it has one, else sha512.
        let algo = [image.osHashAlgo?.lowercased(), "sha512", "md5"].compactMap { $0 }.first { result.hashes[$0] != nil }
        row.recordedHashAlgo = algo
        row.recordedHash = algo.flatMap { result.hashes[$0] }

        // A file of this image being evicted right now must be gone before ours takes its name.
        await removals[id]?.value
        if config.forceRaw && declared != .raw {
            setState(jobID, &row, .converting)
            let dataBytes: UInt64
            do { dataBytes = try await fetcher.rawDataBytes(fetched) } catch {
                await fetched.discard()
                throw error
            }
            do { try await makeRoom(for: id, bytes: (reserved[id] ?? 0) + dataBytes) } catch {
                await fetched.discard()
                throw error
            }
            try await fetcher.convertToRaw(fetched, id: id)
            row.storedFormat = ImageFormat.raw.rawValue
        } else {
            try await fetcher.commit(fetched)
            row.storedFormat = declared.rawValue
        }
        let finalPath = fetcher.finalPath(id)
        row.path = finalPath
        let allocated: UInt64?? = try? await offload { FileSystem.allocatedBytes(finalPath) }
        row.diskBytes = (allocated ?? nil) ?? result.bytes
        row.verifiedAt = Date().timeIntervalSince1970
        row.lastUsed = Date().timeIntervalSince1970
        setState(jobID, &row, .ready)
        logger.info("image cached", metadata: ["image": "\(id)", "bytes": "\(result.bytes)", "path": "\(finalPath)"])
        return row
    }

    private func verifying(_ jobID: String, _ id: String) {
        guard var row = catalog.get(id) else { return }
        setState(jobID, &row, .verifying)
    }

    // MARK: space

    /// Reserves `bytes` for an image's fetch, evicting least recently used images if needed. The victims leave
    /// the index at once; their files are unlinked on the executor, and this returns once they are gone.
    func makeRoom(for id: String, bytes: UInt64) async throws {
        let others = reserved.filter { $0.key != id }.values.reduce(0, +)
        let directory = config.directory
        let free = config.minFree > 0 ? try await offload { FileSystem.freeBytes(directory) } : nil
        let candidates = catalog.evictionOrder().filter { !$0.pinned && (leases[$0.id] ?? 0) == 0 && $0.id != id && inflight[$0.id] == nil }
        guard let plan = EvictionPlan.make(needed: bytes, alreadyReserved: reserved[id] ?? 0, used: catalog.totalDiskBytes(),
                                           reservedByOthers: others, maxSize: config.maxSize, minFree: config.minFree,
                                           freeBytes: free, candidates: candidates) else {
            let used = catalog.totalDiskBytes() + others
            throw CacheError.noRoom(id: id, needed: bytes, available: config.maxSize > used ? config.maxSize - used : 0)
        }
        for victim in plan.victims {
            removeFiles(victim)
            metrics.evictions += 1
            logger.notice("evicted", metadata: ["image": "\(victim.id)", "bytes": "\(victim.diskBytes)"])
        }
        reserved[id] = bytes
        // The room is real only once the victims' blocks are freed (min_free reads the file system).
        for victim in plan.victims { await removals[victim.id]?.value }
    }

    /// Drops the row now and unlinks the file on the executor (unlinking a large file takes time).
    private func removeFiles(_ row: CachedImage) {
        catalog.remove(row.id)
        guard let path = row.path else { return }
        let id = row.id
        let previous = removals[id]
        removals[id] = Task {
            await previous?.value
            await cleanup { try? FileSystem.remove(path) }
            self.removed(id)
        }
    }

    private func removed(_ id: String) {
        removals[id] = nil
    }

    // MARK: operator actions

    /// Removes an image from the cache; refuses while it is pinned, in use or being fetched.
    public func evict(_ id: String) async throws {
        try Self.check(id)
        guard let row = catalog.get(id) else { throw CacheError.notCached(id) }
        if inflight[id] != nil { throw CacheError.busy(id: id, why: "being fetched") }
        if row.pinned { throw CacheError.busy(id: id, why: "pinned (unpin it first)") }
        if (leases[id] ?? 0) > 0 { throw CacheError.busy(id: id, why: "in use") }
        removeFiles(row)
        metrics.evictions += 1
        await removals[id]?.value
    }

    public func setPinned(_ id: String, _ pinned: Bool) throws -> CachedImage {
        try Self.check(id)
        guard var row = catalog.get(id) else { throw CacheError.notCached(id) }
        row.pinned = pinned
        catalog.save(row)
        return row
    }

    /// Re-verifies ready images (`Scrubber`): a file that fails is removed and the image marked error. Each file
    /// is hashed on the jobs lane; cancelling the calling task stops the hash within a MiB.
    public func scrub(_ ids: [String]? = nil) async throws -> [(id: String, ok: Bool, detail: String)] {
        let key = UUID()
        let task = Task { try await self.runScrub(ids) }
        scrubs[key] = task
        defer { scrubs[key] = nil }
        return try await withTaskCancellationHandler { try await task.value } onCancel: { task.cancel() }
    }

    private func runScrub(_ ids: [String]?) async throws -> [(id: String, ok: Bool, detail: String)] {
        var out: [(String, Bool, String)] = []
        let rows = catalog.all().filter { $0.state == .ready && (ids == nil || ids!.contains($0.id)) }
        for row in rows {
            try Task.checkCancellation()
            guard let path = row.path else { continue }
            let job = Job(imageID: row.id, kind: .scrub, state: .verifying, bytesTotal: row.diskBytes)
            jobs.record(job)
            let outcome: Scrubber.Outcome
            do {
                outcome = try await offload(.jobs) { token in try Scrubber.verify(row, path: path, token: token) }
            } catch {
                jobs.update(job.id) { $0.state = error is CancellationError ? .cancelled : .error; $0.error = "\(error)" }
                throw error
            }
            // The row may have changed (evicted, re-fetched) while the file was hashed.
            guard var current = catalog.get(row.id), current.path == path else { continue }
            if outcome.ok == false {
                removeFiles(current)
                current.state = .error
                current.error = "scrub: \(outcome.detail); the file was removed"
                current.path = nil
                current.diskBytes = 0
                catalog.save(current)
                // The caller (an operator, a test, the periodic scrub) is told the image is corrupt only once its
                // file is gone, as evict does.
                await removals[row.id]?.value
                metrics.errors["scrub", default: 0] += 1
                logger.error("scrub found a corrupt image", metadata: ["image": "\(row.id)", "detail": "\(outcome.detail)"])
            } else if outcome.ok == true {
                current.verifiedAt = Date().timeIntervalSince1970
                catalog.save(current)
            }
            let ok = outcome.ok != false
            jobs.update(job.id) { $0.state = ok ? .ready : .error; $0.error = ok ? nil : outcome.detail; $0.bytesDone = row.diskBytes }
            out.append((row.id, ok, outcome.detail))
        }
        return out
    }

    // MARK: files deleted behind the cache's back

    /// Ready images whose file is gone (Nova's image cache manager deletes `_base` files no instance uses once
    /// they are older than remove_unused_original_minimum_age_seconds; an operator may delete one): each goes to
    /// `missing`, stops counting against max_size, and is fetched again on its next use. One stat per file, off
    /// the actor. Returns the ids found missing.
    @discardableResult
    public func checkFiles(_ ids: [String]? = nil) async -> [String] {
        let rows = catalog.all().filter { $0.state == .ready && $0.path != nil && (ids == nil || ids!.contains($0.id)) }
        guard !rows.isEmpty else { return [] }
        let paths = rows.map { $0.path! }
        let looked: [Bool]? = try? await offload { paths.map { FileSystem.exists($0) } }
        guard let present = looked else { return [] }
        var gone: [String] = []
        for (row, here) in zip(rows, present) where !here {
            // The row may have changed while the files were looked at (evicted, fetched again).
            guard var now = catalog.get(row.id), now.state == .ready, now.path == row.path, inflight[row.id] == nil else { continue }
            now.state = .missing
            now.error = "the file \(row.path!) disappeared (deleted outside the agent, e.g. by Nova's image cache manager); "
                + "it is fetched again on its next use"
            now.path = nil
            now.diskBytes = 0
            catalog.save(now)
            metrics.errors["missing", default: 0] += 1
            logger.warning("a cached file disappeared", metadata: ["image": "\(row.id)", "path": "\(row.path!)", "pinned": "\(row.pinned)"])
            gone.append(row.id)
        }
        return gone
    }

    /// The agent's periodic check: `checkFiles`, then pinned images that are missing are fetched again at once
    /// (throttled, as prefetch is); prefetched ones come back on the next prefetch pass. Returns the ids found
    /// missing by this check.
    @discardableResult
    public func checkFilesAndRestorePinned() async -> [String] {
        let gone = await checkFiles()
        for row in catalog.all() where row.state == .missing && row.pinned && inflight[row.id] == nil {
            do {
                _ = try await ensure(row.id, throttled: true)
            } catch {
                logger.error("cannot fetch a pinned image again", metadata: ["image": "\(row.id)", "error": "\(error)"])
            }
        }
        return gone
    }

    /// Cancels running fetches and scrubs and waits for them (their temporary files are removed on the way out),
    /// then the pending unlinks and index writes: graceful shutdown.
    public func shutdown() async {
        let tasks = inflight.values.map(\.task)
        let scrubbing = Array(scrubs.values)
        for t in tasks { t.cancel() }
        for t in scrubbing { t.cancel() }
        for t in tasks { _ = try? await t.value }
        for t in scrubbing { _ = try? await t.value }
        for t in Array(removals.values) { await t.value }
        await catalog.flush()
        events.finishAll()
    }

    /// Waits until every index write so far is persisted (tests).
    public func flushIndex() async { await catalog.flush() }
}
