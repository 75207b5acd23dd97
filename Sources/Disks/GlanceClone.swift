import Foundation
import Glance
import ImageFormats
import Logging
import RBD
import SystemIO

/// The Glance-clone path: a raw image Glance keeps in this cluster (`rbd://<fsid>/<pool>/<image>/<snap>`) becomes
/// the disk as a clone of that snapshot; nothing is downloaded or written.
///
/// The snapshot is inspected first, as every other path is: its first MiB and its last 512 bytes are read and
/// every signature the inspector knows is looked for. Glance says raw; any other format's header (a qcow2 with a
/// backing file registered as raw, a VMDK descriptor, a VHD footer) means the clone is refused (422), since
/// qemu on the hypervisor could be told to probe it.
struct GlanceClonePlanner: Sendable {
    let pool: RBDPool
    let logger: Logger

    /// Glance's own copy of a raw image in this cluster, when there is one. The image shows its locations when
    /// Glance has `show_image_direct_url` or `show_multiple_locations`; otherwise a user with the service role
    /// reads them with `GET /v2/images/{id}/locations` (Glance 29+), asked only when the image shows fewer
    /// locations than it has stores (or none). `hidden` says why no location could be read, for the disk's
    /// `fallback` when the base path is taken instead; `listed` is what that call returned (the cinder path reads
    /// it instead of asking again).
    func location(_ image: GlanceImage, glance: GlanceClient?) async throws
        -> (location: GlanceRBDLocation?, hidden: String?, listed: [String]?) {
        guard image.diskFormat == "raw" else { return (nil, nil, nil) }
        var candidates = image.locations.compactMap(GlanceRBDLocation.init)
        var hidden: String?
        var urls: [String]?
        if candidates.isEmpty, image.locations.isEmpty || image.locations.count < image.stores.count, let glance {
            if let listed = try? await glance.locations(image.id) {
                urls = listed.map(\.url)
                candidates = listed.compactMap { GlanceRBDLocation($0.url) }
            } else {
                hidden = "Glance shows no locations for the image and GET /v2/images/{id}/locations is refused to this "
                    + "agent's user (it needs the service role, Glance 29+), so a copy of the image in an rbd store cannot be "
                    + "cloned: give the user the service role or set Glance's show_image_direct_url"
            }
        }
        guard !candidates.isEmpty else { return (nil, hidden, urls) }
        let fsid = try await pool.run { try $0.cluster.fsid() }
        return (candidates.first { $0.fsid.lowercased() == fsid.lowercased() }, nil, urls)
    }

    /// Inspects the snapshot, then clones it into `<pool>/<instance>_disk` grown to the requested size.
    func clone(_ loc: GlanceRBDLocation, request: DiskRequest) async throws -> DiskInfo {
        let logger = self.logger
        return try await pool.run { io in
            let source = loc.pool == io.pool ? io : try io.cluster.ioContext(pool: loc.pool)
            let parent = try source.openImage(loc.image, snapshot: loc.snapshot)
            let virtualSize: UInt64
            do {
                defer { parent.close() }
                virtualSize = try parent.stat().size
                let found = try Self.signatures(parent, size: virtualSize)
                guard found.isEmpty else {
                    throw DiskError.unsafe(id: request.imageID, reasons: [
                        "format-mismatch: Glance declares the image raw, but its snapshot \(loc.pool)/\(loc.image)@\(loc.snapshot) "
                            + "carries the signature of \(found.joined(separator: ", ")); it is not cloned"])
                }
            }
            let size = try RBDBackend.clone(source, loc.image, loc.snapshot, virtualSize: virtualSize, request: request, into: io)
            logger.info("cloned Glance's rbd image", metadata: ["parent": "\(loc)", "disk": "\(io.pool)/\(request.diskName)"])
            return DiskInfo(name: request.diskName, backend: "rbd", location: "\(io.pool)/\(request.diskName)", size: size,
                            parent: "\(loc.pool)/\(loc.image)@\(loc.snapshot)", imageID: request.imageID, method: .glanceClone,
                            bytesWritten: 0)
        }
    }

    /// Bytes read from the snapshot: the first MiB and the last 512 (where the VHD footer and the DMG trailer sit).
    static let headBytes = 1 << 20

    /// Every non-raw signature in the snapshot's head and tail (iso9660 is raw).
    static func signatures(_ image: RBDImage, size: UInt64) throws -> [String] {
        let head = try readFully(image, at: 0, count: Int(min(size, UInt64(headBytes))))
        let tailStart = size > 512 ? size - 512 : 0
        let tail = try readFully(image, at: tailStart, count: Int(size - tailStart))
        let storage = ProbeStorage(name: "rbd:\(image.io.pool)/\(image.name)", size: size, head: head, tail: tail, tailStart: tailStart)
        return try ImageInspector.signatures(storage).filter { $0 != "iso9660" }
    }

    static func readFully(_ image: RBDImage, at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = try out.withUnsafeMutableBytes { try image.read(at: offset + UInt64(done), into: UnsafeMutableRawBufferPointer(rebasing: $0[done...])) }
            if n <= 0 { break }
            done += n
        }
        return out
    }
}

/// The head and the tail of an image as storage for the signature probes: a read anywhere else is an error
/// (the probes that look further, such as VHDX's metadata, then report the format without its size).
final class ProbeStorage: ImageStorage, @unchecked Sendable {
    let name: String
    let size: UInt64
    let head: [UInt8]
    let tail: [UInt8]
    let tailStart: UInt64

    init(name: String, size: UInt64, head: [UInt8], tail: [UInt8], tailStart: UInt64) {
        self.name = name
        self.size = size
        self.head = head
        self.tail = tail
        self.tailStart = tailStart
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws {
        try checkRange(offset: offset, length: UInt64(buffer.count), what: what)
        let end = offset + UInt64(buffer.count)
        if end <= UInt64(head.count) {
            head.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(end)])) }
        } else if offset >= tailStart {
            tail.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset - tailStart)..<Int(end - tailStart)])) }
        } else {
            throw ImageError.outOfRange(offset: offset, length: UInt64(buffer.count), virtualSize: UInt64(head.count))
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
