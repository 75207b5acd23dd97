import Foundation
import Logging
import RBD
import Synchronization
import SystemIO

/// `[rbd]` settings.
public struct RBDSettings: Sendable, Equatable {
    /// Where instance disks and shared bases go (Nova's `images_rbd_pool`).
    public var pool = "vms"
    public var ceph: CephConfiguration
    /// Seconds a build lease lasts without renewal: how long other agents wait after a builder died or stalled.
    public var leaseSeconds = 30
    /// Seconds an agent waits for another agent's build of the same base before giving up.
    public var baseWait = 3600
    /// Shared bases are `<prefix><image_id>` with the protected snapshot `snapshot`.
    public var basePrefix = "imgconv-base-"
    public var snapshot = "imgconv"
    /// log2 of the RBD object size of bases (22: 4 MiB, Ceph's default).
    public var order = 22
    /// Seconds a fenced builder stays blocklisted (it is never used again; its agent opens a new client).
    public var fenceSeconds: UInt32 = 3600
    /// `[glance] copy_to_store`: the rbd store a raw image in no local rbd store is first copied to (nil: never).
    public var copyToStore: String?
    /// `[glance] copy_timeout`: seconds to wait for that copy before building the base instead.
    public var copyTimeout: Double = 600
    /// `[cinder] enabled`: look for an image's Cinder volume in this cluster (`cinder-clone`).
    public var cinder = true
    /// `[cinder] endpoint_override`: the block-storage API (`http://host:8776/v3/<project_id>`) instead of the
    /// catalog's `volumev3`.
    public var cinderEndpoint: String?
    /// `[cinder] timeout`: seconds for one Cinder API request.
    public var cinderTimeout: Int64 = 15
    /// `[cinder_stores]`: Glance cinder store → the RBD pool of its volume type's back end (no API call needed).
    public var cinderStores: [String: String] = [:]

    public init(ceph: CephConfiguration) { self.ceph = ceph }

    func baseName(_ imageID: String) -> String { basePrefix + imageID }
    func leaseObject(_ imageID: String) -> String { "imgconv-lease.\(imageID)" }
}

/// The agent's connection to the cluster: one client and an I/O context on the disks pool, opened on first use,
/// and opened again after a call found it shut down (ESHUTDOWN: blocklisted by an operator, or its session lost).
/// Every call runs on the executor. Builds do not use it: each has a client of its own (`newClient`), so fencing
/// a stalled build fences nothing else.
final class RBDPool: Sendable {
    let settings: RBDSettings
    private let connection = Mutex<IOContext?>(nil)
    let logger: Logger

    init(settings: RBDSettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    /// The pool's I/O context, connecting on first use (and again after a failed attempt).
    func io() async throws -> IOContext {
        if let io = connection.withLock({ $0 }) { return io }
        let io = try await newClient(label: "agent pool \(settings.pool)")
        connection.withLock { $0 = $0 ?? io }
        return connection.withLock { $0! }
    }

    /// A client of its own on the disks pool. `background`: created on a job thread, so its librados threads
    /// inherit background priority (a base build's client).
    func newClient(label: String, background: Bool = false) async throws -> IOContext {
        let settings = self.settings
        return try await offload(background ? .jobs : .calls) { () throws(CephError) -> IOContext in
            try RadosCluster(settings.ceph, label: label).ioContext(pool: settings.pool)
        }
    }

    /// Runs `body` on the executor with the pool's I/O context; a client found shut down is dropped, so the next
    /// call reconnects.
    func run<T: Sendable>(_ lane: BlockingExecutor.Lane = .calls, _ body: @escaping @Sendable (IOContext) throws -> T) async throws -> T {
        let io = try await io()
        do {
            return try await offload(lane) { try body(io) }
        } catch let e as CephError where e.errno == ESHUTDOWN {
            connection.withLock { if $0 === io { $0 = nil } }
            logger.warning("the cluster client was shut down (blocklisted?); reconnecting on the next call", metadata: ["error": "\(e)"])
            throw e
        }
    }

    /// Drops the connection: the client shuts down once the calls still using it are done.
    func close() {
        connection.withLock { $0 = nil }
    }
}

/// The cluster-wide right to build one image's base: an exclusive RADOS lock with a duration on the object
/// `imgconv-lease.<image_id>`, renewed while the build runs; Ceph expires it when the holder stops renewing.
///
/// Fencing, as librbd's exclusive lock does it: the holder records its client address on the lease object, in one
/// OSD-asserted operation with the lock (`guardedSetXattr`). Whoever takes the lease next and finds a record that
/// is not its own knows the last holder stopped renewing without releasing (it died, or it stalled and may wake
/// up): it blocklists that address before it touches anything, so whatever the stalled holder tries afterwards
/// fails (ESHUTDOWN) and it can never publish. A builder therefore holds the lease with a client of its own.
final class BuildLease: Sendable {
    static let lockName = "build"
    static let recordKey = "imgconv.builder"
    /// Cookies of holders that record nothing (GC, a waiter's probe) start with it; a builder's never do.
    static let unrecordedPrefix = "gc-"

    let io: IOContext
    let object: String
    let cookie: String
    let seconds: Int
    /// The address of the holder this acquisition fenced, if it fenced one.
    let fenced: String?

    private init(io: IOContext, object: String, cookie: String, seconds: Int, fenced: String?) {
        self.io = io
        self.object = object
        self.cookie = cookie
        self.seconds = seconds
        self.fenced = fenced
    }

    /// Takes the lease, or returns nil while another holds it. A builder (`record`) records its address; the
    /// garbage collector takes the lease only to keep builders out, and records nothing. Blocking.
    static func acquire(io: IOContext, object: String, seconds: Int, description: String, record: Bool,
                        fenceSeconds: UInt32, logger: Logger) throws -> BuildLease? {
        let cookie = (record ? "" : unrecordedPrefix) + UUID().uuidString.lowercased()
        guard try io.lease(object: object, name: lockName, cookie: cookie, description: description, seconds: seconds, renew: false) else {
            return nil
        }
        do {
            var fenced: String?
            if let raw = try io.xattr(object: object, name: recordKey) {
                let parts = String(decoding: raw, as: UTF8.self).split(separator: " ", maxSplits: 1).map(String.init)
                if parts.count == 2, parts[0] != cookie {
                    try io.cluster.blocklist(address: parts[1], seconds: fenceSeconds)
                    fenced = parts[1]
                    logger.warning("fenced a base builder that stopped renewing its lease", metadata: [
                        "lease": "\(io.pool)/\(object)", "builder": "\(parts[1])", "cookie": "\(parts[0])"])
                }
            }
            let value: [UInt8]? = record ? Array("\(cookie) \(try io.cluster.address())".utf8) : nil
            if record || fenced != nil {
                guard try io.guardedSetXattr(object: object, lock: lockName, cookie: cookie, name: recordKey, value: value) else {
                    try? io.releaseLease(object: object, name: lockName, cookie: cookie)
                    return nil
                }
            }
            return BuildLease(io: io, object: object, cookie: cookie, seconds: seconds, fenced: fenced)
        } catch {
            try? io.releaseLease(object: object, name: lockName, cookie: cookie)
            throw error
        }
    }

    /// Sets (nil: removes) an extended attribute of the lease object while the lease is held; false when it is
    /// not held any more. Blocking.
    func set(_ name: String, _ value: [UInt8]?) throws -> Bool {
        try io.guardedSetXattr(object: object, lock: Self.lockName, cookie: cookie, name: name, value: value)
    }

    /// Renews the lease; false when it expired or was taken over. Blocking.
    func renew() throws -> Bool {
        try io.lease(object: object, name: Self.lockName, cookie: cookie, description: "", seconds: seconds, renew: true)
    }

    /// Clears the record (while still held) and unlocks: the next holder has nobody to fence. Blocking; never
    /// throws (a lease that is gone is released already).
    func release() {
        _ = try? io.guardedSetXattr(object: object, lock: Self.lockName, cookie: cookie, name: Self.recordKey, value: nil)
        try? io.releaseLease(object: object, name: Self.lockName, cookie: cookie)
    }
}
