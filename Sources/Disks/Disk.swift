import Cache
import Glance
import RBD

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

    /// Nova's name for an instance's root disk: `<instance_uuid>_disk`.
    public var diskName: String { "\(instanceUUID.lowercased())_disk" }
}

/// How a disk was made.
public enum DiskMethod: String, Sendable, Codable {
    /// A clone of Glance's own RBD image (its `rbd://` location): no data moved at all.
    case glanceClone = "glance-clone"
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
    }
}

/// Why a disk could not be made, listed or removed. Each message says what to do.
public enum DiskError: Error, Sendable, CustomStringConvertible {
    case invalidID(field: String, value: String)
    case invalidName(String)
    case exists(String)
    case notFound(String)
    case sizeTooSmall(requested: UInt64, virtualSize: UInt64)
    case imageNotActive(id: String, status: String)
    case unsafe(id: String, reasons: [String])
    case leaseLost(String)
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
        case let .imageNotActive(id, status):
            return "image \(id) is '\(status)' in Glance, not 'active'"
        case let .unsafe(id, reasons):
            return "image \(id) was refused by the inspection: \(reasons.joined(separator: "; "))"
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
}

extension DiskBackend {
    public func collectGarbage(idleSeconds: Double) async throws -> [String] {
        try await collectGarbage(idleSeconds: idleSeconds, images: nil)
    }

    public var counters: [(name: String, value: Int)] { [] }
}

/// The front door: checks the request, asks Glance about the image, and hands it to the backend.
public struct DiskService: Sendable {
    public let backend: any DiskBackend
    public let source: any ImageSource
    public let cache: ImageCache

    public init(backend: any DiskBackend, source: any ImageSource, cache: ImageCache) {
        self.backend = backend
        self.source = source
        self.cache = cache
    }

    public func create(_ request: DiskRequest) async throws -> DiskInfo {
        guard ImageID.isValid(request.instanceUUID) else { throw DiskError.invalidID(field: "instance_uuid", value: request.instanceUUID) }
        guard ImageID.isValid(request.imageID) else { throw DiskError.invalidID(field: "image_id", value: request.imageID) }
        let image = try await source.show(request.imageID)
        guard image.status == "active" else { throw DiskError.imageNotActive(id: image.id, status: image.status) }
        return try await backend.create(request, image: image, cache: cache, source: source)
    }

    /// `<uuid>_disk` and nothing else: names reach Ceph and paths.
    public static func validateName(_ name: String) throws {
        guard name.hasSuffix("_disk"), ImageID.isValid(String(name.dropLast(5))) else { throw DiskError.invalidName(name) }
    }
}
