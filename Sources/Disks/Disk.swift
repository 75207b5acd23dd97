import Cache
import Foundation
import Glance
import Logging
import RBD
import Synchronization

/// A request for an instance's root disk, as `POST /v1/disks` takes it.
public struct DiskRequest: Sendable, Equatable {
    public var instanceUUID: String
    public var imageID: String
    /// The flavor's root disk in bytes; nil: the image's virtual size. Smaller than the image is refused.
    public var size: UInt64?

    public init(instanceUUID: String, imageID: String, size: UInt64? = nil) {
        self.instanceUUID = instanceUUID
        self.imageID = imageID
        self.size = size
    }

    /// Nova's name for an instance's root disk: `<instance_uuid>_disk` (the uuid is canonical: the edge
    /// normalised it).
    public var diskName: String { "\(instanceUUID)_disk" }
}

/// How a disk was made.
public enum DiskMethod: String, Sendable, Codable {
    /// A clone of Glance's own RBD image (its `rbd://` location): no data moved at all.
    case glanceClone = "glance-clone"
    /// Glance copied the image into a local rbd store first (`[glance] copy_to_store`), then a clone of the copy.
    case copyToStore = "copy-to-store"
    /// A raw image whose Glance store is Cinder on this cluster: a clone of a shared base this request copied from
    /// the image's volume inside the cluster (verified and inspected; nothing through glance-api).
    case cinderClone = "cinder-clone"
    /// The same for another format: converted from the volume through librbd into the shared base.
    case cinderConvert = "cinder-convert"
    /// A clone of a shared base this request built (download, convert, stream into RBD).
    case baseBuilt = "base-built"
    /// A clone of a shared base that already existed, or that another agent built while this one waited.
    case baseReused = "base-reused"
    /// A local qcow2 overlay whose backing file is the raw base.
    case overlay
}

/// An instance disk.
public struct DiskInfo: Sendable, Equatable, Codable {
    public var name: String
    /// "rbd" or "local".
    public var backend: String
    /// "pool/name" for RBD, the file path for local disks.
    public var location: String
    public var size: UInt64
    /// What it is a copy-on-write child of: "pool/image@snap", or the backing file.
    public var parent: String?
    public var imageID: String?
    public var method: DiskMethod?
    /// Request to ready, for a disk made by this call.
    public var seconds: Double?
    /// Bytes written into the cluster (or the local base) for this request: 0 for a clone of an existing base.
    public var bytesWritten: UInt64?
    /// Why a cheaper path (Glance clone, cinder-clone, copy-to-store) was not taken, when it was tried.
    public var fallback: String?

    public init(name: String, backend: String, location: String, size: UInt64, parent: String? = nil,
                imageID: String? = nil, method: DiskMethod? = nil, seconds: Double? = nil, bytesWritten: UInt64? = nil) {
        self.name = name
        self.backend = backend
        self.location = location
        self.size = size
        self.parent = parent
        self.imageID = imageID
        self.method = method
        self.seconds = seconds
        self.bytesWritten = bytesWritten
    }

    enum CodingKeys: String, CodingKey {
        case name, backend, location, size, parent, method, seconds
        case imageID = "image_id"
        case bytesWritten = "bytes_written"
        case fallback
    }
}

/// Why a disk could not be made, listed or removed. Each message says what to do.
public enum DiskError: Error, Sendable, CustomStringConvertible {
    case invalidID(field: String, value: String)
    case invalidName(String)
    case exists(String)
    case notFound(String)
    case sizeTooSmall(requested: UInt64, virtualSize: UInt64)
    case sizeTooLarge(requested: UInt64, max: UInt64)
    case imageNotActive(id: String, status: String)
    case unsafe(id: String, reasons: [String])
    case leaseLost(String)
    /// Another agent took the build over and fenced this one (its cluster client is blocklisted).
    case fenced
    case baseTimeout(id: String, seconds: Int)
    case busy(String)
    case ceph(CephError)
    case io(String)

    public var description: String {
        switch self {
        case let .invalidID(field, value):
            return "\(field) '\(value.prefix(80))' is not a UUID"
        case let .invalidName(n):
            return "'\(n.prefix(120))' is not an instance disk name (<instance_uuid>_disk)"
        case let .exists(n):
            return "disk \(n) already exists; delete it first (DELETE /v1/disks/\(n))"
        case let .notFound(n):
            return "disk \(n) does not exist"
        case let .sizeTooSmall(requested, virtualSize):
            return "size \(requested) is smaller than the image's virtual size \(virtualSize); ask for at least \(virtualSize) bytes"
        case let .sizeTooLarge(requested, max):
            return "size \(requested) is larger than [disks] max_size (\(max) bytes)"
        case let .imageNotActive(id, status):
            return "image \(id) is '\(status)' in Glance, not 'active'"
        case let .unsafe(id, reasons):
            return "image \(id) was refused by the inspection: \(reasons.joined(separator: "; "))"
        case .fenced:
            return "another agent took over this base build and fenced this builder; its base is used instead"
        case let .leaseLost(what):
            return "lost the build lease on \(what) (another agent took it over after this one stalled); the partial base was removed"
        case let .baseTimeout(id, s):
            return "waited \(s) s for another agent to build the base of image \(id); raise [rbd] base_wait or check that agent"
        case let .busy(s):
            return s
        case let .ceph(e):
            return e.description
        case let .io(s):
            return s
        }
    }
}

/// Where instance disks live: RBD clones in a pool, or qcow2 overlays in a directory.
public protocol DiskBackend: Sendable {
    var name: String { get }
    func create(_ request: DiskRequest, image: GlanceImage, cache: ImageCache, source: any ImageSource) async throws -> DiskInfo
    func list() async throws -> [DiskInfo]
    func get(_ name: String) async throws -> DiskInfo
    func remove(_ name: String) async throws
    func flatten(_ name: String) async throws -> DiskInfo
    /// Removes bases with no children that have been unused for `idleSeconds`; returns their names. With `images`,
    /// only the bases of those Glance image ids are considered.
    func collectGarbage(idleSeconds: Double, images: Set<String>?) async throws -> [String]
    /// Counters for /metrics: disks made by method, bases built, take-overs from dead builders.
    var counters: [(name: String, value: Int)] { get }
    /// Releases what the backend holds (the cluster connection) before the process exits.
    func shutdown() async
}

extension DiskBackend {
    public func collectGarbage(idleSeconds: Double) async throws -> [String] {
        try await collectGarbage(idleSeconds: idleSeconds, images: nil)
    }

    public var counters: [(name: String, value: Int)] { [] }

    public func shutdown() async {}
}

/// The front door: checks the request, asks Glance about the image, and hands it to the backend. Every create
/// is a job (`JobBook`, kind `disk`): a caller may wait for it (`create`) or take the job and poll (`start`,
/// `POST /v1/disks?wait=false`). Builds run in tasks of their own, so a client that hangs up does not abort a base
/// other instances are waiting for; `shutdown` cancels them all.
public final class DiskService: Sendable {
    public let backend: any DiskBackend
    public let source: any ImageSource
    public let cache: ImageCache
    public var jobs: JobBook { cache.jobs }
    /// `[disks] max_size`.
    public let maxSize: UInt64
    let logger: Logger
    private let running = Mutex<[String: Task<DiskInfo, Error>]>([:])

    public init(backend: any DiskBackend, source: any ImageSource, cache: ImageCache, maxSize: UInt64 = 64 << 40,
                logger: Logger = Logger(label: "imgconv.disks")) {
        self.backend = backend
        self.source = source
        self.cache = cache
        self.maxSize = maxSize
        self.logger = logger
    }

    /// Makes the disk and waits for it.
    public func create(_ request: DiskRequest) async throws -> DiskInfo {
        let (_, task) = try begin(request)
        return try await task.value
    }

    /// Starts making the disk and returns its job at once.
    public func start(_ request: DiskRequest) throws -> Job {
        try begin(request).job
    }

    private func begin(_ request: DiskRequest) throws -> (job: Job, task: Task<DiskInfo, Error>) {
        try validate(request)
        let job = Job(imageID: request.imageID, kind: .disk, state: .building, disk: request.diskName)
        jobs.record(job)
        let task = Task { () throws -> DiskInfo in
            defer { _ = self.running.withLock { $0.removeValue(forKey: job.id) } }
            do {
                let info = try await self.make(request)
                self.jobs.update(job.id) { $0.state = .ready }
                return info
            } catch {
                let cancelled = error is CancellationError
                self.jobs.update(job.id) { $0.state = cancelled ? .cancelled : .error; $0.error = "\(error)" }
                throw error
            }
        }
        running.withLock { $0[job.id] = task }
        return (job, task)
    }

    /// The request's ids must be canonical (the control API normalises them) and its size within bounds.
    func validate(_ request: DiskRequest) throws {
        guard ImageID.isCanonical(request.instanceUUID) else { throw DiskError.invalidID(field: "instance_uuid", value: request.instanceUUID) }
        guard ImageID.isCanonical(request.imageID) else { throw DiskError.invalidID(field: "image_id", value: request.imageID) }
        if let size = request.size, size > maxSize { throw DiskError.sizeTooLarge(requested: size, max: maxSize) }
    }

    private func make(_ request: DiskRequest) async throws -> DiskInfo {
        let image = try await source.show(request.imageID)
        guard image.status == "active" else { throw DiskError.imageNotActive(id: image.id, status: image.status) }
        return try await backend.create(request, image: image, cache: cache, source: source)
    }

    /// Cancels every create in flight and waits for them (each removes what it had half made).
    public func shutdown() async {
        let tasks = running.withLock { Array($0.values) }
        for t in tasks { t.cancel() }
        for t in tasks { _ = try? await t.value }
        await backend.shutdown()
    }

    /// `<uuid>_disk` and nothing else: names reach Ceph and paths. Returns the canonical name.
    public static func validateName(_ name: String) throws {
        guard name.hasSuffix("_disk"), ImageID.isCanonical(String(name.dropLast(5))) else { throw DiskError.invalidName(name) }
    }

    /// The canonical form of a disk name given at an edge, or nil.
    public static func normalizedName(_ name: String) -> String? {
        guard name.hasSuffix("_disk"), let id = ImageID.normalized(String(name.dropLast(5))) else { return nil }
        return id + "_disk"
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
