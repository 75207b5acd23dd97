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
/// by the next builder or by GC. Other agents poll for the final name; when a builder dies or stalls its lease
/// expires in `leaseSeconds`, the next one fences it (`BuildLease`) and takes over. A builder that finds itself
/// fenced (ESHUTDOWN) drops its client and goes back to waiting: it clones what the other published.
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
    func ensure(_ image: GlanceImage, cache: ImageCache, source: any ImageSource, volume: CinderVolumeImage? = nil) async throws -> Base {
        let base = settings.baseName(image.id), snapshot = settings.snapshot
        let deadline = ContinuousClock.now + .seconds(settings.baseWait)
        var delay = 0.05
        var waited = false
        var client: IOContext?
        while true {
            try Task.checkCancellation()
            if let size = try await pool.run(.calls, { try Self.readyBase($0, base, snapshot: snapshot) }) {
                return Base(name: base, built: false, written: 0, size: size)
            }
            let io: IOContext
            if let c = client { io = c } else {
                io = try await pool.newClient(label: "base builder of \(image.id)", background: true)
                client = io
            }
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
                    let written = try await build(image, base: base, lease: lease, cache: cache, source: source, volume: volume)
                    await cleanup { lease.release() }
                    stats.add(\.basesBuilt)
                    guard let size = try await pool.run(.calls, { try Self.readyBase($0, base, snapshot: snapshot) }) else {
                        throw DiskError.io("base \(settings.pool)/\(base) vanished right after it was built")
                    }
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
            waited = true
            guard ContinuousClock.now < deadline else { throw DiskError.baseTimeout(id: image.id, seconds: settings.baseWait) }
            try await Task.sleep(for: .seconds(delay))
            delay = min(delay * 1.5, 0.5)
        }
    }

    /// Builds the base under the lease into `<base>.part-<cookie>` with the lease's own client, then publishes it
    /// (snapshot, protect, rename) right after a renewal. The lease is renewed every third of its duration; if a
    /// renewal fails the copy stops and the part is removed. Cancellation stops it the same way.
    func build(_ image: GlanceImage, base: String, lease: BuildLease, cache: ImageCache, source: any ImageSource,
               volume: CinderVolumeImage?) async throws -> UInt64 {
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
        do {
            try await fencedCall {
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
                img.close()
                try io.renameImage(part, to: base)
            }
        } catch {
            await cleanup { try? Self.removeWithSnapshots(io, part) }
            throw error
        }
        logger.info("base ready", metadata: ["base": "\(io.pool)/\(base)", "bytes_written": "\(written)",
                                             "seconds": "\(started.duration(to: .now).seconds)"])
        return written
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
