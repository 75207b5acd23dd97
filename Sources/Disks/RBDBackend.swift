import Cache
import Foundation
import Glance
import Logging
import RBD
import Synchronization
import SystemIO

/// Instance disks as RBD clones, Nova's `images_type = rbd` layout: `<pool>/<instance_uuid>_disk`. This type is
/// the facade; each job is in its own place:
///
/// - `GlanceClonePlanner`: the image is raw and Glance keeps it in this cluster: its snapshot is inspected and
///   cloned. Nothing is downloaded or written.
/// - `CinderLocator`: the image is in a Glance cinder store whose volumes are RBD images of this cluster: the
///   shared base is made from the volume inside the cluster (`cinder-clone`, `cinder-convert`).
/// - `BaseBuilder` and `BuildLease`: otherwise one shared base per Glance image, built once cluster-wide under a
///   fenced lease, and every instance is a clone of it.
/// - `BaseGC`: bases nobody uses, and leftovers of dead builders.
/// - `RBDPool`: the agent's cluster connection (builds have clients of their own).
public final class RBDBackend: DiskBackend, Sendable {
    public let name = "rbd"
    public var settings: RBDSettings { pool.settings }
    let pool: RBDPool
    let builder: BaseBuilder
    let planner: GlanceClonePlanner
    let gc: BaseGC
    let copier: StoreCopier?
    let logger: Logger
    /// Counters for /metrics and tests.
    public let stats = Counters()

    public struct Stats: Sendable, Equatable {
        public var glanceClones = 0
        public var basesBuilt = 0
        public var baseClones = 0
        public var takeovers = 0
        public var storeCopies = 0
        /// Bases made from the image's Cinder volume (`cinder-clone`, `cinder-convert`).
        public var cinderBases = 0
        public init(glanceClones: Int = 0, basesBuilt: Int = 0, baseClones: Int = 0, takeovers: Int = 0, storeCopies: Int = 0,
                    cinderBases: Int = 0) {
            (self.glanceClones, self.basesBuilt, self.baseClones, self.takeovers) = (glanceClones, basesBuilt, baseClones, takeovers)
            (self.storeCopies, self.cinderBases) = (storeCopies, cinderBases)
        }
    }

    /// The counters, shared with the builder.
    public final class Counters: Sendable {
        private let value = Mutex(Stats())
        public var snapshot: Stats { value.withLock { $0 } }
        func add(_ counter: WritableKeyPath<Stats, Int> & Sendable) { value.withLock { $0[keyPath: counter] += 1 } }
    }

    public var counters: [(name: String, value: Int)] {
        let s = stats.snapshot
        return [("glance_clones", s.glanceClones), ("base_clones", s.baseClones), ("bases_built", s.basesBuilt),
                ("takeovers", s.takeovers), ("store_copies", s.storeCopies), ("cinder_bases", s.cinderBases)]
    }

    public init(settings: RBDSettings, logger: Logger = Logger(label: "imgconv.disks.rbd")) {
        self.logger = logger
        pool = RBDPool(settings: settings, logger: logger)
        builder = BaseBuilder(pool: pool, stats: stats, logger: logger)
        planner = GlanceClonePlanner(pool: pool, logger: logger)
        gc = BaseGC(pool: pool, logger: logger)
        let pool = self.pool
        copier = settings.copyToStore.map { StoreCopier(pool: pool, store: $0, timeout: settings.copyTimeout, logger: logger) }
    }

    /// The disks pool's I/O context (tests, tools).
    public func poolContext() async throws -> IOContext { try await pool.io() }

    public func fsid() async throws -> String { try await pool.run { try $0.cluster.fsid() } }

    public func shutdown() async { pool.close() }

    // MARK: create

    public func create(_ request: DiskRequest, image: GlanceImage, cache: ImageCache, source: any ImageSource) async throws -> DiskInfo {
        let started = ContinuousClock.now
        let name = request.diskName
        if try await pool.run(.calls, { try $0.imageExists(name) }) { throw DiskError.exists(name) }

        let planned = try await planner.location(image, glance: source.glance)
        if let location = planned.location {
            var info = try await planner.clone(location, request: request)
            info.seconds = started.duration(to: .now).seconds
            stats.add(\.glanceClones)
            return info
        }

        var fallback = planned.hidden
        var volume: CinderVolumeImage?
        // Only for an image in a cinder store whose base is still to build: once the base exists, every disk is a
        // clone of it whatever its source was (and a fleet of clones pays no extra open of it).
        let baseName = settings.baseName(image.id), snapshot = settings.snapshot
        let inCinder = settings.cinder ? await CinderLocator.locations(image, listed: planned.listed, glance: source.glance) : []
        if !inCinder.isEmpty, try await pool.run(.calls, { try BaseBuilder.readyBase($0, baseName, snapshot: snapshot) }) == nil {
            switch await cinderLocator(source.glance).locate(image, candidates: inCinder) {
            case .none: break
            case let .found(v): volume = v
            case let .unusable(why):
                try Task.checkCancellation()
                logger.warning("the image's Cinder volume is not used; building the base from Glance", metadata: ["image": "\(image.id)", "reason": "\(why)"])
                fallback = why
            }
        }
        if volume == nil, image.diskFormat == "raw", let copier, let glance = source.glance {
            switch await copier.copy(image, glance: glance) {
            case let .copied(location):
                var info = try await planner.clone(location, request: request)
                info.method = .copyToStore
                info.seconds = started.duration(to: .now).seconds
                stats.add(\.storeCopies)
                logger.info("disk ready", metadata: ["disk": "\(info.location)", "method": "copy-to-store", "seconds": "\(info.seconds!)"])
                return info
            case let .fallback(why):
                try Task.checkCancellation()
                logger.warning("copy-to-store not used; building the shared base", metadata: ["image": "\(image.id)", "reason": "\(why)"])
                fallback = why
            }
        }

        let built: DiskMethod = volume == nil ? .baseBuilt : image.diskFormat == "raw" ? .cinderClone : .cinderConvert
        let cloneBase = { @Sendable (base: BaseBuilder.Base) async throws -> DiskInfo in
            try await self.pool.run { io throws -> DiskInfo in
                let size = try Self.clone(io, base.name, snapshot, virtualSize: base.size, request: request, into: io)
                return DiskInfo(name: name, backend: "rbd", location: "\(io.pool)/\(name)", size: size,
                                parent: "\(io.pool)/\(base.name)@\(snapshot)", imageID: image.id,
                                method: base.built ? built : .baseReused, bytesWritten: base.written)
            }
        }
        logger.debug("looking for the base", metadata: ["image": "\(image.id)", "since_request": "\(started.duration(to: .now).seconds)"])
        var base = try await builder.ensure(image, cache: cache, source: source, volume: volume)
        var info: DiskInfo
        do {
            let cloning = ContinuousClock.now
            info = try await cloneBase(base)
            logger.debug("cloned the base", metadata: ["disk": "\(info.location)", "seconds": "\(cloning.duration(to: .now).seconds)",
                                                       "since_request": "\(started.duration(to: cloning).seconds)"])
        } catch let error as CephError where base.hinted && (error.errno == ENOENT || error.errno == EINVAL) {
            // Recorded as ready on its lease, but gone (or unprotected: removed by hand, not by GC, which drops
            // the record first): look again under the lease, building it if need be.
            logger.warning("the base recorded as ready is gone; looking again", metadata: ["base": "\(settings.pool)/\(base.name)", "error": "\(error)"])
            base = try await builder.ensure(image, cache: cache, source: source, volume: volume, trustHint: false)
            info = try await cloneBase(base)
        }
        info.fallback = fallback
        info.seconds = started.duration(to: .now).seconds
        stats.add(\.baseClones)
        if volume != nil && base.built { stats.add(\.cinderBases) }
        logger.info("disk ready", metadata: ["disk": "\(info.location)", "method": "\(info.method!.rawValue)",
                                             "seconds": "\(info.seconds!)"])
        return info
    }

    func cinderLocator(_ glance: GlanceClient?) -> CinderLocator {
        let s = settings
        let client = glance.map {
            CinderClient(http: $0.http, auth: $0.endpoint.auth, interface: $0.endpoint.interface, region: $0.endpoint.region,
                         endpointOverride: s.cinderEndpoint, timeout: .seconds(s.cinderTimeout), logger: logger)
        }
        return CinderLocator(cinder: client, stores: s.cinderStores, pool: pool)
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

    /// Records that a base was just used (GC counts idleness from its build or its last disk's removal).
    static func touch(_ io: IOContext, _ base: String) throws {
        let img = try io.openImage(base)
        defer { img.close() }
        try img.setMetadata("imgconv.last_used", String(Int(Date().timeIntervalSince1970)))
    }

    // MARK: list, get, remove, flatten

    public func list() async throws -> [DiskInfo] {
        let prefix = settings.basePrefix
        return try await pool.run { io in
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
        let prefix = settings.basePrefix
        return try await pool.run { io in
            do { return try Self.info(io, name, basePrefix: prefix) } catch let e as CephError where e.errno == ENOENT { throw DiskError.notFound(name) }
        }
    }

    public func remove(_ name: String) async throws {
        try DiskService.validateName(name)
        let prefix = settings.basePrefix
        try await pool.run(.jobs) { io in
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
        let prefix = settings.basePrefix
        return try await pool.run(.jobs) { io in
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
        try await gc.collect(idleSeconds: idleSeconds, images: images)
    }
}
