import Cache
import Convert
import Foundation
import Glance
import ImageFormats
import Logging
import RBD
import Synchronization
import SystemIO

/// Shared bases: one per Glance image, `<pool>/imgconv-base-<image_id>@imgconv`, built once cluster-wide.
///
/// The builder holds the image's `BuildLease` with a client of its own. The image comes from the node cache
/// (verified against Glance's hashes, inspected), or straight from Glance while it downloads, is converted and
/// streamed into `<base>.part-<cookie>` (data only), then snapshotted, protected and only then renamed to its
/// final name. A half-written base only ever exists under a `.part-` name, which is never cloned and is removed
/// by the next builder or by GC. When a builder dies or stalls its lease expires in `leaseSeconds`, the next one
/// fences it (`BuildLease`) and takes over. A builder that finds itself fenced (ESHUTDOWN) drops its client and
/// goes back to waiting: it clones what the other published.
///
/// Waiting is cheap for the cluster, because a fleet of nodes asks for a new image at once: the builder records
/// the published base's size on the lease object (`readyKey`) and notifies its watchers (`BaseWaiter`); a waiter
/// checks that attribute and tries the lease itself with the agent's shared client (one operation each, nothing
/// recorded, so that client is never fenced), then sleeps until the notify. Only an agent that finds the lease
/// free connects a client of its own to build with, and a waiter that reads the attribute clones at once,
/// without opening the base (13 reads of its header less per clone).
final class BaseBuilder: Sendable {
    let pool: RBDPool
    let logger: Logger
    var settings: RBDSettings { pool.settings }
    let stats: RBDBackend.Counters

    init(pool: RBDPool, stats: RBDBackend.Counters, logger: Logger) {
        self.pool = pool
        self.stats = stats
        self.logger = logger
    }

    struct Base: Sendable {
        var name: String
        var built: Bool
        var written: UInt64
        var size: UInt64
        /// Known from the lease object's `readyKey` only (the base was not opened): a clone that finds no base
        /// means the attribute outlived it (removed by hand), and `ensure` runs again with `trustHint: false`.
        var hinted = false
    }

    /// The lease object's extended attribute holding the published base's virtual size (decimal). Written by the
    /// builder under its lease right after the rename; removed by GC under the lease before the base.
    static let readyKey = "imgconv.ready"

    /// The size the lease object records for a published base; nil when none is recorded (or it does not parse).
    /// One read. Blocking.
    static func readyHint(_ io: IOContext, leaseObject: String) throws -> UInt64? {
        guard let raw = try io.xattr(object: leaseObject, name: readyKey) else { return nil }
        return UInt64(String(decoding: raw, as: UTF8.self))
    }

    /// Records the published base's size under `lease` (what `readyHint` reads); false when the lease is gone.
    /// Blocking.
    static func recordReady(_ lease: BuildLease, size: UInt64) throws -> Bool {
        try lease.set(readyKey, Array(String(size).utf8))
    }

    /// The base's virtual size if it is complete (it has its protected snapshot); nil if it does not exist.
    static func readyBase(_ io: IOContext, _ base: String, snapshot: String) throws -> UInt64? {
        do {
            let img = try io.openImage(base, snapshot: snapshot)
            defer { img.close() }
            return try img.stat().size
        } catch where error.errno == ENOENT {
            return nil
        }
    }

    /// Returns the base once it is complete, building it if no other agent is: from `volume` (the image's Cinder
    /// volume in this cluster) when given, otherwise from the cache or Glance.
    func ensure(_ image: GlanceImage, cache: ImageCache, source: any ImageSource, volume: CinderVolumeImage? = nil,
                trustHint: Bool = true) async throws -> Base {
        let waiter = BaseWaiter(pool: pool, object: settings.leaseObject(image.id), logger: logger)
        let builderClient = BuilderClient()
        defer { builderClient.retire() }
        do {
            let base = try await ensure(image, cache: cache, source: source, volume: volume, trustHint: trustHint,
                                        waiter: waiter, builderClient: builderClient)
            await waiter.close()
            return base
        } catch {
            await waiter.close()
            throw error
        }
    }

    /// The builder's own librados client, once connected. Its last reference is dropped by `retire` on a blocking
    /// thread, after the disk's request has moved on: `rados_shutdown` joins the client's threads, which took up
    /// to a second with a fleet's clones in flight, and must not run on the cooperative pool either.
    final class BuilderClient: Sendable {
        private let slot = Mutex<IOContext?>(nil)
        var io: IOContext? {
            get { slot.withLock { $0 } }
            set { slot.withLock { $0 = newValue } }
        }

        func retire() {
            guard let retained = slot.withLock({ s -> Unmanaged<IOContext>? in
                defer { s = nil }
                return s.map { Unmanaged.passRetained($0) }
            }) else { return }
            BlockingExecutor.shared.submit(.calls) { retained.release() }
        }
    }

    private func ensure(_ image: GlanceImage, cache: ImageCache, source: any ImageSource, volume: CinderVolumeImage?,
                        trustHint: Bool, waiter: BaseWaiter, builderClient: BuilderClient) async throws -> Base {
        let base = settings.baseName(image.id), snapshot = settings.snapshot, leaseObject = settings.leaseObject(image.id)
        let deadline = ContinuousClock.now + .seconds(settings.baseWait)
        var delay = 0.05
        var waited = false
        var client: IOContext? {
            get { builderClient.io }
            set { builderClient.io = newValue }
        }
        while true {
            try Task.checkCancellation()
            let seen = waiter.generation
            if trustHint, let size = try await pool.run(.calls, { try Self.readyHint($0, leaseObject: leaseObject) }) {
                return Base(name: base, built: false, written: 0, size: size, hinted: true)
            }
            switch try await probe(image.id, base: base, snapshot: snapshot, askHolder: !waited) {
            case let .ready(size): return Base(name: base, built: false, written: 0, size: size)
            case let .held(byBuilder):
                // Waiting for a builder (not another agent's probe, nor GC): if this agent builds after all, it is
                // a take-over.
                if byBuilder { waited = true }
                guard ContinuousClock.now < deadline else { throw DiskError.baseTimeout(id: image.id, seconds: settings.baseWait) }
                // Woken by the builder's notify; the timeout is the fallback for a notify that was lost.
                delay = await waiter.wait(since: seen, delay: delay)
                continue
            case let .free(held):
                if held.fenced != nil { waited = true }
                // The probe keeps the lease while this agent connects its builder's client (0.1-0.7 s with a
                // fleet starting at once), so the others keep waiting instead of connecting clients of their own;
                // it is handed over in the two operations between its release and the builder's acquisition.
                do {
                    if client == nil {
                        let connecting = ContinuousClock.now
                        client = try await pool.newClient(label: "base builder of \(image.id)", background: true)
                        logger.debug("connected the base builder's client", metadata: ["image": "\(image.id)", "seconds": "\(connecting.duration(to: .now).seconds)"])
                    }
                } catch {
                    await cleanup { held.release() }
                    throw error
                }
                await cleanup { held.release() }
            }
            guard let io = client else { continue }
            let settings = self.settings, logger = self.logger
            let desc = "imgconv base build of \(image.id) on \(ProcessInfo.processInfo.hostName) pid \(getpid())"
            let lease: BuildLease?
            do {
                lease = try await offload {
                    try BuildLease.acquire(io: io, object: settings.leaseObject(image.id), seconds: settings.leaseSeconds,
                                           description: desc, record: true, fenceSeconds: settings.fenceSeconds, logger: logger)
                }
            } catch let e as CephError where e.errno == ESHUTDOWN {
                client = nil  // this builder's client was fenced: a new one, and wait for the other's base
                logger.warning("this agent's base builder was fenced; waiting for the other builder", metadata: ["image": "\(image.id)"])
                continue
            }
            if let lease {
                do {
                    // Someone may have finished between our check and the lease.
                    if let size = try await offload(.calls, { try Self.readyBase(io, base, snapshot: snapshot) }) {
                        await cleanup { lease.release() }
                        return Base(name: base, built: false, written: 0, size: size)
                    }
                    // Waited for another builder and its base never appeared, or fenced a stalled one: a take-over.
                    if waited || lease.fenced != nil { stats.add(\.takeovers) }
                    let (written, size) = try await build(image, base: base, lease: lease, cache: cache, source: source, volume: volume)
                    await cleanup { lease.release() }
                    await waiter.notifyPublished(io: io)
                    stats.add(\.basesBuilt)
                    return Base(name: base, built: true, written: written, size: size)
                } catch DiskError.fenced {
                    // Another agent took the lease over and fenced this builder: its part is that agent's to remove.
                    client = nil
                    logger.warning("this base build was fenced by another agent; using its base", metadata: ["image": "\(image.id)"])
                    continue
                } catch {
                    await cleanup { lease.release() }
                    throw error
                }
            }
            // Another agent took the lease between the probe and this acquisition.
            waited = true
            guard ContinuousClock.now < deadline else { throw DiskError.baseTimeout(id: image.id, seconds: settings.baseWait) }
            delay = await waiter.wait(since: seen, delay: delay)
        }
    }

    enum Probe: Sendable {
        /// The base is published (found under the lease: one written before `readyKey` existed, or whose attribute
        /// was lost); the attribute is now recorded.
        case ready(UInt64)
        /// Somebody holds the lease: `byBuilder` when it is a builder, not another agent's probe or GC (told by
        /// the lock's cookie), asked only with `askHolder`.
        case held(byBuilder: Bool)
        /// Nobody held it: the probe's lease, still held, for the caller to release. `fenced` on it: the last
        /// holder had stopped renewing and was fenced by this probe.
        case free(BuildLease)
    }

    /// Takes the lease with the shared client, recording nothing (as GC does), to learn whether somebody holds it,
    /// and while holding it whether the base is already published. Costs a waiter one operation while a builder
    /// holds the lease, two with `askHolder`.
    func probe(_ imageID: String, base: String, snapshot: String, askHolder: Bool) async throws -> Probe {
        let settings = self.settings, logger = self.logger
        return try await pool.run(.calls) { io -> Probe in
            let object = settings.leaseObject(imageID)
            guard let lease = try BuildLease.acquire(io: io, object: object, seconds: settings.leaseSeconds,
                                                     description: "imgconv base probe", record: false,
                                                     fenceSeconds: settings.fenceSeconds, logger: logger) else {
                guard askHolder else { return .held(byBuilder: false) }
                let holders = try io.lockers(object: object, name: BuildLease.lockName)
                return .held(byBuilder: holders.contains { !$0.cookie.hasPrefix(BuildLease.unrecordedPrefix) })
            }
            do {
                guard let size = try Self.readyBase(io, base, snapshot: snapshot) else { return .free(lease) }
                _ = try Self.recordReady(lease, size: size)
                lease.release()
                return .ready(size)
            } catch {
                lease.release()
                throw error
            }
        }
    }

    /// Builds the base under the lease into `<base>.part-<cookie>` with the lease's own client, then publishes it
    /// (snapshot, protect, rename) right after a renewal. The lease is renewed every third of its duration; if a
    /// renewal fails the copy stops and the part is removed. Cancellation stops it the same way.
    func build(_ image: GlanceImage, base: String, lease: BuildLease, cache: ImageCache, source: any ImageSource,
               volume: CinderVolumeImage?) async throws -> (written: UInt64, size: UInt64) {
        let started = ContinuousClock.now
        let io = lease.io, snapshot = settings.snapshot, logger = self.logger
        let part = "\(base).part-\(lease.cookie.prefix(8))"
        // Leftovers of builders that died or were fenced: we hold the lease, so their parts are garbage.
        let leftovers = try await fencedCall { try io.listImages().filter { $0.hasPrefix(base + ".part-") } }
        for old in leftovers {
            do { try await fencedCall { try Self.removeWithSnapshots(io, old) } } catch DiskError.fenced { throw DiskError.fenced } catch {
                logger.warning("could not remove an abandoned partial base yet", metadata: ["image": "\(old)", "error": "\(error)"])
            }
        }

        let lost = Atomic<Bool>(false)
        let renewer = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(Double(lease.seconds) / 3))
                if Task.isCancelled { return }
                let held = (try? await offload { try lease.renew() }) ?? false
                if !held { lost.store(true, ordering: .relaxed); return }
            }
        }
        defer { renewer.cancel() }
        let stop: @Sendable () -> Bool = { lost.load(ordering: .relaxed) }

        let written: UInt64
        do {
            if let volume {
                written = try await copy(image, from: volume, into: part, io: io, cache: cache, verify: source.verifiesHashes, stop: stop)
            } else {
                written = try await copy(image, into: part, io: io, cache: cache, source: source, stop: stop)
            }
        } catch {
            await cleanup { try? Self.removeWithSnapshots(io, part) }
            if Self.isFenced(error) { throw DiskError.fenced }
            if lost.load(ordering: .relaxed) { throw DiskError.leaseLost("\(io.pool)/\(base)") }
            throw error
        }
        let size: UInt64
        do {
            size = try await fencedCall {
                // Publish only right after a renewal: a builder whose lease expired never publishes, and one that
                // was taken over was fenced (its calls fail here with ESHUTDOWN).
                guard try lease.renew() else { throw DiskError.leaseLost("\(io.pool)/\(base)") }
                Failpoints.hit("base.before-publish")
                let img = try io.openImage(part)
                defer { img.close() }
                try img.createSnapshot(snapshot)
                try img.protectSnapshot(snapshot)
                try img.setMetadata("imgconv.image_id", image.id)
                try img.setMetadata("imgconv.builder", "\(ProcessInfo.processInfo.hostName) pid \(getpid()) lease \(lease.cookie)")
                try img.setMetadata("imgconv.last_used", String(Int(Date().timeIntervalSince1970)))
                let size = try img.stat().size
                img.close()
                try io.renameImage(part, to: base)
                // Waiters clone as soon as they read this; without it (the lease was lost right after the rename)
                // they find the base under the lease instead. Published: nothing may fail the build from here on.
                if (try? Self.recordReady(lease, size: size)) != true {
                    logger.warning("could not record the base as ready on its lease", metadata: ["base": "\(io.pool)/\(base)"])
                }
                return size
            }
        } catch {
            await cleanup { try? Self.removeWithSnapshots(io, part) }
            throw error
        }
        logger.info("base ready", metadata: ["base": "\(io.pool)/\(base)", "bytes_written": "\(written)",
                                             "seconds": "\(started.duration(to: .now).seconds)"])
        return (written, size)
    }

    /// A blocking call with the builder's client; ESHUTDOWN (this client was blocklisted) becomes `fenced`.
    func fencedCall<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        do { return try await offload { try body() } } catch where Self.isFenced(error) { throw DiskError.fenced }
    }

    static func isFenced(_ error: Error) -> Bool {
        switch error {
        case let e as CephError: return e.errno == ESHUTDOWN
        case DiskError.ceph(let e): return e.errno == ESHUTDOWN
        case DiskError.fenced: return true
        default: return false
        }
    }

    /// The image into the part: raw and not on this node, straight from Glance (hashes verified on the way, no
    /// local copy); another format not on this node, converted while it downloads; otherwise from the cache.
    func copy(_ image: GlanceImage, into part: String, io: IOContext, cache: ImageCache, source: any ImageSource,
              stop: @escaping @Sendable () -> Bool) async throws -> UInt64 {
        let order = settings.order, logger = self.logger
        let cached = try await cache.image(image.id)?.state == .ready
        let download: Fill = { sink in _ = try await source.download(image, into: sink, throttled: false, progress: nil) }
        if image.diskFormat == "raw", !cached, let size = image.virtualSize ?? image.size {
            logger.info("building base from Glance", metadata: ["base": "\(io.pool)/\(part)", "image": "\(image.id)"])
            return try await streamRaw(image, size: size, part: part, io: io, fill: download, stop: stop)
        }
        if !cached, let size = image.size,
           let format = CacheError.declaredFormat(diskFormat: image.diskFormat, containerFormat: image.containerFormat) {
            return try await streamConvert(image, format: format, size: size, part: part, io: io,
                                           directory: cache.config.directory, fill: download, stop: stop)
        }
        let row = try await cache.acquire(image.id)
        defer { Task { await cache.release(image.id) } }
        guard let path = row.path else { throw DiskError.io("image \(image.id) is cached without a file") }
        let format = ImageFormat(rawValue: row.storedFormat ?? row.diskFormat) ?? .raw
        logger.info("building base", metadata: ["base": "\(io.pool)/\(part)", "from": "\(path)", "format": "\(format.rawValue)"])
        return try await offload(.jobs) { token throws -> UInt64 in
            let (verdict, opened) = ImageInspector.inspect(path: path, declared: format)
            guard verdict.safe, let opened else { throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description)) }
            return try Self.convert(opened, into: part, io: io, order: order, token: token, stop: stop)
        }
    }

    /// The image's Cinder volume into the part, inside the cluster: the first `size` bytes of `<pool>/volume-<id>`
    /// (the volume is rounded up to whole GiB) are read front to back through librbd (`VolumeStream`), hashed
    /// against Glance's `os_hash_value` (or `checksum`) on the way, and go down the same pipeline as a download from
    /// Glance: straight into the part for a raw image, through a conversion that follows the stream for the other
    /// formats; the full inspection runs before anything is published. Nothing goes through glance-api, and the
    /// volume is only read: no snapshot of it, so Cinder can delete it (with the Glance image) while disks of the
    /// base exist.
    func copy(_ image: GlanceImage, from volume: CinderVolumeImage, into part: String, io: IOContext, cache: ImageCache,
              verify: Bool, stop: @escaping @Sendable () -> Bool) async throws -> UInt64 {
        guard let size = image.size,
              let format = CacheError.declaredFormat(diskFormat: image.diskFormat, containerFormat: image.containerFormat) else {
            throw DiskError.unsafe(id: image.id, reasons: ["unsupported-format: \(image.diskFormat ?? "none")/\(image.containerFormat ?? "none")"])
        }
        let expected = try VerifiedDownload.expectations(image, verify: verify)
        logger.info("building base from the image's Cinder volume", metadata: ["base": "\(io.pool)/\(part)", "volume": "\(volume)",
                                                                            "via": "\(volume.via)", "format": "\(format.rawValue)"])
        let source = try await offload { try io.cluster.ioContext(pool: volume.pool).openImage(volume.image, readOnly: true) }
        let stream = VolumeStream(image: source, size: size)
        let fill: Fill = { sink in try await stream.stream(into: sink, imageID: image.id, expected: expected, stop: stop) }
        let written: UInt64
        do {
            if format == .raw {
                written = try await streamRaw(image, size: size, part: part, io: io, fill: fill, stop: stop)
            } else {
                written = try await streamConvert(image, format: format, size: size, part: part, io: io,
                                                  directory: cache.config.directory, fill: fill, stop: stop)
            }
        } catch {
            await cleanup { source.close() }
            throw error
        }
        await cleanup { source.close() }
        return written
    }

    /// What fills a stream: a verified download from Glance, or a volume read through librbd.
    typealias Fill = @Sendable (any DownloadSink) async throws -> Void

    /// A raw image streamed into the part as it arrives (zero blocks skipped, hashes checked by `fill`), then
    /// inspected in the cluster before it may be published.
    func streamRaw(_ image: GlanceImage, size: UInt64, part: String, io: IOContext, fill: Fill,
                   stop: @escaping @Sendable () -> Bool) async throws -> UInt64 {
        let sink = RBDSink(io: io, name: part, order: settings.order)
        do {
            try await offload { try sink.begin(virtualSize: size) }
            try await fill(RBDStreamSink(sink, stop: stop))
            try await offload(.jobs) {
                try sink.finish()
                let (verdict, _) = ImageInspector.inspect(storage: try RBDStorage(io.openImage(part, readOnly: true)), declared: .raw)
                guard verdict.safe else { throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description)) }
            }
        } catch {
            await cleanup { sink.abort() }
            throw error
        }
        return sink.bytesWritten
    }

    /// Converts `opened` into the part (only data is written). The converter stops when the job is cancelled
    /// (CancellationError) or the lease is lost (`leaseLost`).
    static func convert(_ opened: any DiskImage, into part: String, io: IOContext, order: Int, token: CancellationToken,
                        stop: @escaping @Sendable () -> Bool) throws -> UInt64 {
        let sink = RBDSink(io: io, name: part, order: order)
        do {
            try Converter(options: .background, cancel: { stop() || token.isCancelled }).convert(opened, to: sink)
        } catch SinkError.cancelled {
            throw token.isCancelled ? CancellationError() : DiskError.leaseLost(part)
        }
        return sink.bytesWritten
    }

    /// Not on this node: the download goes to a private file next to the cache while the converter follows it
    /// (`GrowingFileStorage`: reads wait for the bytes), streaming into the part as the data arrives. The format's
    /// reader opens the declared format directly, bounds-checked as always; the full inspection (detection,
    /// polyglots, structure) runs on the complete file once its hashes matched (alongside the converter's last
    /// writes), and the part is published only if it is clean. Nothing raw is ever stored locally. Cancelling the
    /// calling task cancels the download and stops the converter.
    func streamConvert(_ image: GlanceImage, format: ImageFormat, size: UInt64, part: String, io: IOContext,
                       directory: String, fill: @escaping Fill, stop: @escaping @Sendable () -> Bool) async throws -> UInt64 {
        let started = ContinuousClock.now
        let path = "\(directory)/stream-\(part.suffix(8))"
        let file = try await offload { try GrowingFile(path: path, size: size) }
        logger.info("building base while downloading", metadata: ["base": "\(io.pool)/\(part)", "format": "\(format.rawValue)"])
        let order = settings.order, logger = self.logger
        return try await withThrowingTaskGroup(of: UInt64?.self) { group in
            defer { file.stopFollowing() }
            group.addTask {
                do {
                    try await fill(file)
                    try await offload { try file.finish(failure: nil) }
                } catch {
                    try? file.finish(failure: "\(error)")
                    throw error
                }
                // The full inspection needs only the complete file: it runs while the converter finishes.
                let (verdict, _) = try await offload(.jobs) { ImageInspector.inspect(path: file.path, declared: format) }
                guard verdict.safe else { throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description)) }
                logger.info("downloaded, verified and inspected", metadata: ["image": "\(image.id)", "seconds": "\(started.duration(to: .now).seconds)"])
                return nil
            }
            group.addTask {
                try await offload(.jobs) { token throws -> UInt64 in
                    defer { file.stopFollowing() }
                    let storage = GrowingFileStorage(file)
                    let opened: any DiskImage
                    switch format {
                    case .raw: opened = RawImage(storage: storage)
                    case .qcow2: opened = try QCOW2Image(storage: storage)
                    case .vmdk: opened = try VMDKImage(storage: storage)
                    case .vpc: opened = try VPCImage(storage: storage)
                    case .vdi: opened = try VDIImage(storage: storage)
                    }
                    return try Self.convert(opened, into: part, io: io, order: order, token: token, stop: stop)
                }
            }
            var written: UInt64 = 0
            do {
                for try await r in group { if let r { written = r } }
            } catch {
                group.cancelAll()
                file.stopFollowing()
                try? file.finish(failure: "stopped: \(error)")
                // Every child must be done before the file closes: the converter reads its descriptors.
                while true {
                    do { guard try await group.next() != nil else { break } } catch { continue }
                }
                await cleanup { file.close() }
                throw error
            }
            await cleanup { file.close() }
            return written
        }
    }

    /// An image whose creator died inside `rbd_create` is listed but has no header (open: ENOENT);
    /// `rbd_remove` still cleans up what there is.
    static func removeWithSnapshots(_ io: IOContext, _ name: String) throws {
        let img: RBDImage
        do {
            img = try io.openImage(name)
        } catch {
            guard error.errno == ENOENT else { throw error }
            try io.removeImage(name)
            return
        }
        for s in try img.snapshots() {
            if try img.isProtected(s.name) { try img.unprotectSnapshot(s.name) }
            try img.removeSnapshot(s.name)
        }
        img.close()
        try io.removeImage(name)
    }
}
