import SystemIO
import Cache
import Convert
import Foundation
import Glance
import ImageFormats
import Logging
import RBD
import Synchronization

/// `[rbd]` settings.
public struct RBDSettings: Sendable, Equatable {
    /// Where instance disks and shared bases go (Nova's `images_rbd_pool`).
    public var pool = "vms"
    public var ceph: CephConfiguration
    /// Seconds an import lease lasts without renewal: how long other agents wait after an importer died.
    public var leaseSeconds = 30
    /// Seconds an agent waits for another agent's import of the same base before giving up.
    public var baseWait = 3600
    /// Shared bases are `<prefix><image_id>` with the protected snapshot `snapshot`.
    public var basePrefix = "imgconv-base-"
    public var snapshot = "imgconv"
    /// log2 of the RBD object size of bases (22: 4 MiB, Ceph's default).
    public var order = 22

    public init(ceph: CephConfiguration) { self.ceph = ceph }
}

/// Instance disks as RBD clones, Nova's `images_type = rbd` layout: `<pool>/<instance_uuid>_disk`.
///
/// - Glance clone: the image is raw and Glance keeps it in this cluster (`rbd://<fsid>/<pool>/<image>/<snap>`):
///   clone that snapshot. Nothing is downloaded or written.
/// - Shared base: otherwise one base per Glance image, `<pool>/imgconv-base-<image_id>@imgconv`, built once
///   cluster-wide: the image comes from the node cache (verified against Glance's hashes, inspected), is
///   converted and streamed straight into RBD (data only), snapshotted, protected, and only then renamed to its
///   final name. Every instance is a clone of it.
/// - Cluster-wide single flight: the builder holds a RADOS lease (`rados_lock_exclusive` with a duration on the
///   object `imgconv-lease.<image_id>`), renewed while it imports. Other agents poll for the final name; when
///   the builder dies the lease expires in `leaseSeconds` and one of them takes over. A half-written base only
///   ever exists under a `.part-<cookie>` name, which is never cloned and is removed by the next builder or GC.
public final class RBDBackend: DiskBackend, @unchecked Sendable {
    public let name = "rbd"
    public let settings: RBDSettings
    let logger: Logger
    private let connection = Mutex<IOContext?>(nil)
    /// Counters for /metrics and tests.
    public let stats = Mutex(Stats())

    public struct Stats: Sendable, Equatable {
        public var glanceClones = 0
        public var basesBuilt = 0
        public var baseClones = 0
        public var takeovers = 0
        public init(glanceClones: Int = 0, basesBuilt: Int = 0, baseClones: Int = 0, takeovers: Int = 0) {
            (self.glanceClones, self.basesBuilt, self.baseClones, self.takeovers) = (glanceClones, basesBuilt, baseClones, takeovers)
        }
    }

    public var counters: [(name: String, value: Int)] {
        let s = stats.withLock { $0 }
        return [("glance_clones", s.glanceClones), ("base_clones", s.baseClones), ("bases_built", s.basesBuilt),
                ("takeovers", s.takeovers)]
    }

    public init(settings: RBDSettings, logger: Logger = Logger(label: "imgconv.disks.rbd")) {
        self.settings = settings
        self.logger = logger
    }

    /// The pool's I/O context, connecting on first use (and again after a failed attempt).
    public func pool() async throws -> IOContext {
        if let io = connection.withLock({ $0 }) { return io }
        let settings = self.settings
        let io = try await offload { () throws(CephError) -> IOContext in
            try RadosCluster(settings.ceph).ioContext(pool: settings.pool)
        }
        connection.withLock { $0 = io }
        return io
    }

    public func fsid() async throws -> String {
        let io = try await pool()
        return try await offload { try io.cluster.fsid() }
    }

    func baseName(_ imageID: String) -> String { settings.basePrefix + imageID.lowercased() }
    func leaseObject(_ imageID: String) -> String { "imgconv-lease.\(imageID.lowercased())" }
    /// The cls lock on the lease object that builders (and GC) hold.
    static let leaseName = "build"

    // MARK: create

    public func create(_ request: DiskRequest, image: GlanceImage, cache: ImageCache, source: any ImageSource) async throws -> DiskInfo {
        let started = ContinuousClock.now
        let io = try await pool()
        let name = request.diskName
        if try await offload { try io.imageExists(name) } { throw DiskError.exists(name) }

        if let location = try await glanceLocation(image, io: io) {
            var info = try await offload { [settings] in
                try Self.cloneGlance(location, request: request, into: io, logger: self.logger, settings: settings)
            }
            info.seconds = started.duration(to: .now).seconds
            stats.withLock { $0.glanceClones += 1 }
            return info
        }

        let (base, built, written, virtualSize) = try await ensureBase(image, io: io, cache: cache, source: source)
        let snapshot = settings.snapshot
        var info = try await offload { () throws -> DiskInfo in
            let size = try Self.clone(io, base, snapshot, virtualSize: virtualSize, request: request, into: io)
            return DiskInfo(name: name, backend: "rbd", location: "\(io.pool)/\(name)", size: size,
                            parent: "\(io.pool)/\(base)@\(snapshot)", imageID: image.id,
                            method: built ? .baseBuilt : .baseReused, bytesWritten: written)
        }
        info.seconds = started.duration(to: .now).seconds
        stats.withLock { $0.baseClones += 1 }
        logger.info("disk ready", metadata: ["disk": "\(info.location)", "method": "\(info.method!.rawValue)",
                                             "seconds": "\(info.seconds!)"])
        return info
    }

    /// Clones `source/parent@snapshot` into `<pool>/<instance>_disk` and grows it to the requested size: one
    /// librbd call when no resize is needed (the clone is not even opened). Returns the disk's size.
    static func clone(_ source: IOContext, _ parent: String, _ snapshot: String, virtualSize: UInt64, request: DiskRequest,
                      into io: IOContext) throws -> UInt64 {
        let size = request.size ?? virtualSize
        guard size >= virtualSize else { throw DiskError.sizeTooSmall(requested: size, virtualSize: virtualSize) }
        do {
            try source.clone(parent: parent, snapshot: snapshot, into: io, name: request.diskName)
        } catch {
            if error.errno == EEXIST { throw DiskError.exists(request.diskName) }
            throw error
        }
        if size > virtualSize {
            let disk = try io.openImage(request.diskName)
            defer { disk.close() }
            try disk.resize(size)
        }
        return size
    }

    /// Glance's own copy of a raw image in this cluster, when there is one: `rbd://fsid/pool/image/snap`.
    func glanceLocation(_ image: GlanceImage, io: IOContext) async throws -> GlanceRBDLocation? {
        guard image.diskFormat == "raw" else { return nil }
        let candidates = image.locations.compactMap(GlanceRBDLocation.init)
        guard !candidates.isEmpty else { return nil }
        let fsid = try await offload { try io.cluster.fsid() }
        return candidates.first { $0.fsid.lowercased() == fsid.lowercased() }
    }

    static func cloneGlance(_ loc: GlanceRBDLocation, request: DiskRequest, into io: IOContext, logger: Logger,
                            settings: RBDSettings) throws -> DiskInfo {
        let source = loc.pool == io.pool ? io : try io.cluster.ioContext(pool: loc.pool)
        let parent = try source.openImage(loc.image, snapshot: loc.snapshot)
        let virtualSize = try parent.stat().size
        parent.close()
        let size = try clone(source, loc.image, loc.snapshot, virtualSize: virtualSize, request: request, into: io)
        logger.info("cloned Glance's rbd image", metadata: ["parent": "\(loc)", "disk": "\(io.pool)/\(request.diskName)"])
        return DiskInfo(name: request.diskName, backend: "rbd", location: "\(io.pool)/\(request.diskName)", size: size,
                        parent: "\(loc.pool)/\(loc.image)@\(loc.snapshot)", imageID: request.imageID, method: .glanceClone,
                        bytesWritten: 0)
    }

    /// Records that a base was just used (GC counts idleness from its build or its last disk's removal; while it
    /// has clones it is never idle).
    static func touch(_ io: IOContext, _ base: String) throws {
        let img = try io.openImage(base)
        defer { img.close() }
        try img.setMetadata("imgconv.last_used", String(Int(Date().timeIntervalSince1970)))
    }

    // MARK: shared bases

    /// The base's virtual size if it is complete (it has its protected snapshot); nil if it does not exist.
    func readyBase(_ io: IOContext, _ base: String) throws -> UInt64? {
        do {
            let img = try io.openImage(base, snapshot: settings.snapshot)
            defer { img.close() }
            return try img.stat().size
        } catch let e as CephError where e.errno == ENOENT {
            return nil
        }
    }

    /// Returns the base's name once it is complete, building it if no other agent is: (name, built here, bytes
    /// written, virtual size).
    func ensureBase(_ image: GlanceImage, io: IOContext, cache: ImageCache, source: any ImageSource) async throws -> (String, Bool, UInt64, UInt64) {
        let base = baseName(image.id)
        let deadline = ContinuousClock.now + .seconds(settings.baseWait)
        var delay = 0.05
        var waited = false
        while true {
            if let size = try await offload { try self.readyBase(io, base) } { return (base, false, 0, size) }
            let cookie = UUID().uuidString.lowercased()
            let object = leaseObject(image.id), seconds = settings.leaseSeconds
            let desc = "imgconv base build of \(image.id) on \(ProcessInfo.processInfo.hostName) pid \(getpid())"
            if try await offload { try io.lease(object: object, name: Self.leaseName, cookie: cookie, description: desc, seconds: seconds, renew: false) } {
                do {
                    // Someone may have finished between our check and the lease.
                    if let size = try await offload { try self.readyBase(io, base) } {
                        try? await offload { try io.releaseLease(object: object, name: Self.leaseName, cookie: cookie) }
                        return (base, false, 0, size)
                    }
                    // Waited for another builder, and its base never appeared: it died, and this agent takes over.
                    if waited { stats.withLock { $0.takeovers += 1 } }
                    let written = try await build(image, base: base, cookie: cookie, io: io, cache: cache, source: source)
                    try? await offload { try io.releaseLease(object: object, name: Self.leaseName, cookie: cookie) }
                    stats.withLock { $0.basesBuilt += 1 }
                    guard let size = try await offload(.calls, { try self.readyBase(io, base) }) else {
                        throw DiskError.io("base \(io.pool)/\(base) vanished right after it was built")
                    }
                    return (base, true, written, size)
                } catch {
                    try? await offload { try io.releaseLease(object: object, name: Self.leaseName, cookie: cookie) }
                    throw error
                }
            }
            waited = true
            guard ContinuousClock.now < deadline else { throw DiskError.baseTimeout(id: image.id, seconds: settings.baseWait) }
            try await Task.sleep(for: .seconds(delay))
            delay = min(delay * 1.5, 0.5)
        }
    }

    /// Builds the base under the lease: the image is inspected and converted (or, raw and not cached, streamed
    /// from Glance) into `<base>.part-<cookie>`, then snapshotted, protected and renamed. The lease is renewed
    /// every third of its duration; if a renewal fails the copy stops and the part is removed.
    func build(_ image: GlanceImage, base: String, cookie: String, io: IOContext, cache: ImageCache,
               source: any ImageSource) async throws -> UInt64 {
        let started = ContinuousClock.now
        let object = leaseObject(image.id), seconds = settings.leaseSeconds, snapshot = settings.snapshot
        // Leftovers of builders that died: their leases are gone (we hold it now), so their parts are garbage.
        let leftovers = try await offload { try io.listImages().filter { $0.hasPrefix(base + ".part-") } }
        for part in leftovers {
            do { try await offload { try Self.removeWithSnapshots(io, part) } } catch {
                logger.warning("could not remove an abandoned partial base yet", metadata: ["image": "\(part)", "error": "\(error)"])
            }
        }

        let lost = Atomic<Bool>(false)
        let renewer = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(Double(seconds) / 3))
                if Task.isCancelled { return }
                let held = (try? await offload { try io.lease(object: object, name: Self.leaseName, cookie: cookie, description: "", seconds: seconds, renew: true) }) ?? false
                if !held { lost.store(true, ordering: .relaxed); return }
            }
        }
        defer { renewer.cancel() }

        let part = "\(base).part-\(cookie.prefix(8))"
        let order = settings.order
        let written: UInt64
        if image.diskFormat == "raw", try await cache.image(image.id)?.state != .ready, let size = image.virtualSize ?? image.size {
            // Raw and not on this node: straight from Glance into Ceph, hashes verified on the way, no local copy.
            logger.info("building base from Glance", metadata: ["base": "\(io.pool)/\(base)", "image": "\(image.id)"])
            let sink = RBDSink(io: io, name: part, order: order)
            do {
                try await offload { try sink.begin(virtualSize: size) }
                _ = try await source.download(image, into: RBDStreamSink(sink, stop: { lost.load(ordering: .relaxed) }),
                                              throttled: false, progress: nil)
                try await offload {
                    try sink.finish()
                    let (verdict, _) = ImageInspector.inspect(storage: try RBDStorage(io.openImage(part, readOnly: true)), declared: .raw)
                    guard verdict.safe else { throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description)) }
                }
            } catch {
                sink.abort()
                if lost.load(ordering: .relaxed) { throw DiskError.leaseLost("\(io.pool)/\(base)") }
                throw error
            }
            written = sink.bytesWritten
        } else if try await cache.image(image.id)?.state != .ready, let size = image.size,
                  let format = CacheError.declaredFormat(diskFormat: image.diskFormat, containerFormat: image.containerFormat) {
            written = try await streamConvert(image, format: format, size: size, part: part, io: io, cache: cache,
                                              source: source, stop: { lost.load(ordering: .relaxed) })
        } else {
            let cached = try await cache.acquire(image.id)
            defer { Task { await cache.release(image.id) } }
            logger.info("image in cache", metadata: ["image": "\(image.id)", "seconds": "\(started.duration(to: .now).seconds)"])
            guard let path = cached.path else { throw DiskError.io("image \(image.id) is cached without a file") }
            let format = ImageFormat(rawValue: cached.storedFormat ?? cached.diskFormat) ?? .raw
            logger.info("building base", metadata: ["base": "\(io.pool)/\(base)", "from": "\(path)", "format": "\(format.rawValue)"])
            written = try await offload { () throws -> UInt64 in
                let (verdict, opened) = ImageInspector.inspect(path: path, declared: format)
                guard verdict.safe, let opened else {
                    throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description))
                }
                let sink = RBDSink(io: io, name: part, order: order)
                do {
                    try Converter(cancel: { lost.load(ordering: .relaxed) }).convert(opened, to: sink)
                } catch SinkError.cancelled {
                    throw DiskError.leaseLost("\(io.pool)/\(base)")
                }
                return sink.bytesWritten
            }
        }
        try await offload {
            // Publish only while still holding the lease: a stalled builder whose lease expired must not.
            guard try io.lease(object: object, name: Self.leaseName, cookie: cookie, description: "", seconds: seconds, renew: true) else {
                try? Self.removeWithSnapshots(io, part)
                throw DiskError.leaseLost("\(io.pool)/\(base)")
            }
            do {
                let img = try io.openImage(part)
                try img.createSnapshot(snapshot)
                try img.protectSnapshot(snapshot)
                try img.setMetadata("imgconv.image_id", image.id)
                try img.setMetadata("imgconv.last_used", String(Int(Date().timeIntervalSince1970)))
                img.close()
                try io.renameImage(part, to: base)
            } catch {
                try? Self.removeWithSnapshots(io, part)
                throw error
            }
        }
        logger.info("base ready", metadata: ["base": "\(io.pool)/\(base)", "bytes_written": "\(written)",
                                             "seconds": "\(started.duration(to: .now).seconds)"])
        return written
    }

    /// Not on this node: the download goes to a private file next to the cache while the converter follows it
    /// (`GrowingFileStorage`: reads wait for the bytes), streaming into the part as the data arrives. The format's
    /// reader opens the declared format directly, bounds-checked as always; the full inspection (detection,
    /// polyglots, structure) runs on the complete file once its hashes matched (alongside the converter's last
    /// writes), and the part is published only if it is clean. Nothing raw is ever stored locally.
    func streamConvert(_ image: GlanceImage, format: ImageFormat, size: UInt64, part: String, io: IOContext,
                       cache: ImageCache, source: any ImageSource, stop: @escaping @Sendable () -> Bool) async throws -> UInt64 {
        let started = ContinuousClock.now
        let file = try GrowingFile(path: "\(cache.config.directory)/stream-\(part.suffix(8))", size: size)
        defer { file.close() }
        logger.info("building base while downloading", metadata: ["base": "\(io.pool)/\(part)", "format": "\(format.rawValue)"])
        let download = Task {
            do {
                let r = try await source.download(image, into: file, throttled: false, progress: nil)
                try file.finish(failure: nil)
                return r
            } catch {
                try? file.finish(failure: "\(error)")
                throw error
            }
        }
        // The full inspection needs only the complete file: it runs as soon as the download is done, while the
        // converter finishes its last writes.
        let inspection = Task { () async throws -> [String] in
            _ = try await download.value
            let (verdict, _) = try await offload { ImageInspector.inspect(path: file.path, declared: format) }
            return verdict.safe ? [] : verdict.reasons.map(\.description)
        }
        let order = settings.order
        do {
            let written = try await offload { () throws -> UInt64 in
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
                let sink = RBDSink(io: io, name: part, order: order)
                do {
                    try Converter(cancel: stop).convert(opened, to: sink)
                } catch SinkError.cancelled {
                    throw DiskError.leaseLost(part)
                }
                return sink.bytesWritten
            }
            _ = try await download.value
            logger.info("downloaded and converted", metadata: ["image": "\(image.id)", "seconds": "\(started.duration(to: .now).seconds)"])
            let unsafe = try await inspection.value
            guard unsafe.isEmpty else { throw DiskError.unsafe(id: image.id, reasons: unsafe) }
            return written
        } catch {
            download.cancel()
            file.stopFollowing()
            try? file.finish(failure: "cancelled")
            _ = try? await download.value
            _ = try? await inspection.value
            try? await offload { try Self.removeWithSnapshots(io, part) }
            throw error
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

    // MARK: list, get, remove, flatten

    public func list() async throws -> [DiskInfo] {
        let io = try await pool()
        let prefix = settings.basePrefix
        return try await offload {
            try io.listImages().filter { $0.hasSuffix("_disk") }.compactMap { name -> DiskInfo? in
                do { return try Self.info(io, name, basePrefix: prefix) } catch let e as CephError where e.errno == ENOENT { return nil }
            }
        }
    }

    /// The image id comes from the parent (a base's name, or Glance's image name), or, after a flatten, from the
    /// metadata flatten leaves behind.
    static func info(_ io: IOContext, _ name: String, basePrefix: String) throws -> DiskInfo {
        let img = try io.openImage(name, readOnly: true)
        defer { img.close() }
        let parent = try img.parent()
        let imageID: String?
        if let p = parent {
            imageID = p.image.hasPrefix(basePrefix) ? String(p.image.dropFirst(basePrefix.count)) : p.image
        } else {
            imageID = try img.metadata("imgconv.image_id")
        }
        return DiskInfo(name: name, backend: "rbd", location: "\(io.pool)/\(name)", size: try img.stat().size,
                        parent: parent?.description, imageID: imageID)
    }

    public func get(_ name: String) async throws -> DiskInfo {
        try DiskService.validateName(name)
        let io = try await pool()
        let prefix = settings.basePrefix
        return try await offload {
            do { return try Self.info(io, name, basePrefix: prefix) } catch let e as CephError where e.errno == ENOENT { throw DiskError.notFound(name) }
        }
    }

    public func remove(_ name: String) async throws {
        try DiskService.validateName(name)
        let io = try await pool()
        let prefix = settings.basePrefix
        try await offload {
            let parent: ParentSpec?
            do {
                let img = try io.openImage(name, readOnly: true)
                parent = try img.parent()
                img.close()
                try io.removeImage(name)
            } catch let e as CephError where e.errno == ENOENT {
                throw DiskError.notFound(name)
            } catch let e as CephError where e.errno == EBUSY {
                throw DiskError.busy("disk \(name) is in use (open by a client, or it has snapshots); stop the instance first")
            }
            if let parent, parent.pool == io.pool, parent.image.hasPrefix(prefix) { try? Self.touch(io, parent.image) }
        }
    }

    public func flatten(_ name: String) async throws -> DiskInfo {
        try DiskService.validateName(name)
        let io = try await pool()
        let prefix = settings.basePrefix
        return try await offload {
            do {
                let before = try Self.info(io, name, basePrefix: prefix)
                let img = try io.openImage(name)
                if let id = before.imageID { try img.setMetadata("imgconv.image_id", id) }
                try img.flatten()
                img.close()
                return try Self.info(io, name, basePrefix: prefix)
            } catch let e as CephError where e.errno == ENOENT {
                throw DiskError.notFound(name)
            }
        }
    }

    // MARK: garbage collection

    public func collectGarbage(idleSeconds: Double, images: Set<String>?) async throws -> [String] {
        let io = try await pool()
        let prefix = settings.basePrefix, snapshot = settings.snapshot, seconds = settings.leaseSeconds
        let logger = self.logger
        return try await offload { () throws -> [String] in
            var removed: [String] = []
            let now = Date().timeIntervalSince1970
            for name in try io.listImages() where name.hasPrefix(prefix) {
                let isPart = name.contains(".part-")
                let imageID = String(name.dropFirst(prefix.count).prefix(36))
                if let images, !images.contains(imageID) { continue }
                let object = self.leaseObject(imageID)
                // Never touch a base while a builder holds its lease.
                let cookie = "gc-" + UUID().uuidString.lowercased()
                guard (try? io.lease(object: object, name: Self.leaseName, cookie: cookie, description: "imgconv gc", seconds: seconds, renew: false)) == true else { continue }
                defer { try? io.releaseLease(object: object, name: Self.leaseName, cookie: cookie) }
                do {
                    if !isPart {
                        let atSnap = try io.openImage(name, snapshot: snapshot)
                        let children = try atSnap.children()
                        atSnap.close()
                        guard children.isEmpty else { continue }
                        let img = try io.openImage(name, readOnly: true)
                        let lastUsed = Double(try img.metadata("imgconv.last_used") ?? "0") ?? 0
                        img.close()
                        guard now - lastUsed >= idleSeconds else { continue }
                    }
                    try Self.removeWithSnapshots(io, name)
                    removed.append(name)
                } catch {
                    // A clone raced us (EBUSY on unprotect) or the image is still open (a dead client's watch lasts
                    // until the OSDs time it out): keep it for the next round.
                    logger.info("gc: not removed yet", metadata: ["image": "\(io.pool)/\(name)", "error": "\(error)"])
                    continue
                }
            }
            return removed
        }
    }
}

/// `rbd://<fsid>/<pool>/<image>/<snapshot>`, as Glance's rbd store writes its locations (components URL-encoded).
public struct GlanceRBDLocation: Sendable, Equatable, CustomStringConvertible {
    public var fsid: String
    public var pool: String
    public var image: String
    public var snapshot: String

    public init?(_ url: String) {
        guard url.hasPrefix("rbd://") else { return nil }
        let parts = url.dropFirst(6).split(separator: "/", omittingEmptySubsequences: false).map {
            String($0).removingPercentEncoding ?? String($0)
        }
        guard parts.count == 4, !parts.contains(where: \.isEmpty) else { return nil }
        (fsid, pool, image, snapshot) = (parts[0], parts[1], parts[2], parts[3])
    }

    public var description: String { "rbd://\(fsid)/\(pool)/\(image)/\(snapshot)" }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
