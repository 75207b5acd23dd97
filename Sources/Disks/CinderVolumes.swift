import Foundation
import Glance
import RBD

/// `cinder://<store>/<volume_id>` (a multi-store Glance's cinder stores) or `cinder://<volume_id>` (a single one),
/// as glance_store's cinder driver writes its locations.
public struct GlanceCinderLocation: Sendable, Equatable, CustomStringConvertible {
    public var store: String?
    public var volumeID: String

    public init?(_ url: String) {
        guard url.hasPrefix("cinder://") else { return nil }
        let parts = url.dropFirst(9).split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        switch parts.count {
        case 1: (store, volumeID) = (nil, parts[0])
        case 2: (store, volumeID) = (parts[0].isEmpty ? nil : parts[0], parts[1])
        default: return nil
        }
        guard ImageID.isValid(volumeID) else { return nil }
        volumeID = volumeID.lowercased()
    }

    public var description: String { "cinder://\(store.map { $0 + "/" } ?? "")\(volumeID)" }
}

/// A Glance image's bytes as a Cinder volume in this cluster: the RBD image `<pool>/volume-<volume_id>`, whose
/// first `size` bytes are the image file (the volume is rounded up to whole GiB).
public struct CinderVolumeImage: Sendable, Equatable, CustomStringConvertible {
    public var pool: String
    public var volumeID: String
    /// How the pool was found, for the log.
    public var via: String

    /// Cinder's RBD driver names a volume's image `volume-<id>` (`volume_name_template`).
    public var image: String { "volume-\(volumeID)" }
    public var description: String { "\(pool)/\(image)" }
}

/// Finds the RBD image behind an image's `cinder://` location.
///
/// The pool of a volume's back end comes from `[cinder_stores]` (`<glance store> = <pool>`, no API call) or from
/// Cinder's API with the agent's Keystone credentials: the volume (`GET /volumes/{id}`: status, `host@backend#pool`,
/// which needs the admin role) and its back end's `location_info` in the scheduler's pool list (fsid and RBD
/// pool; `get_pools` is admin-only too). The volume must be Glance's volume of this image (metadata
/// `glance_image_id`, or the name `image-<id>`), available or in use, and in this cluster. Whatever fails, the
/// answer says why, and the disk is made the usual way (its `fallback` carries the reason).
struct CinderLocator: Sendable {
    let cinder: CinderClient?
    /// `[cinder_stores]`: Glance cinder store → RBD pool of its volume type's back end.
    let stores: [String: String]
    let pool: RBDPool

    enum Outcome: Sendable {
        case none
        case found(CinderVolumeImage)
        case unusable(String)
    }

    /// The image's cinder locations: shown, or read with the service role when the image shows fewer locations
    /// than stores (`listed`: what the Glance-clone planner already read that way; nil if it did not ask).
    static func locations(_ image: GlanceImage, listed: [String]?, glance: GlanceClient?) async -> [GlanceCinderLocation] {
        var found = (image.locations + (listed ?? [])).compactMap(GlanceCinderLocation.init)
        if found.isEmpty, listed == nil, image.locations.isEmpty || image.locations.count < image.stores.count,
           let glance, let more = try? await glance.locations(image.id) {
            found = more.compactMap { GlanceCinderLocation($0.url) }
        }
        return found
    }

    func locate(_ image: GlanceImage, candidates: [GlanceCinderLocation]) async -> Outcome {
        guard !candidates.isEmpty else { return .none }
        var reasons: [String] = []
        for loc in candidates {
            do {
                return .found(try await resolve(loc, image: image))
            } catch {
                reasons.append("\(loc): \(error)")
            }
        }
        return .unusable(reasons.joined(separator: "; "))
    }

    struct Refused: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    /// The volume's RBD image, checked to exist in this cluster and to be at least the image's size.
    func resolve(_ loc: GlanceCinderLocation, image: GlanceImage) async throws -> CinderVolumeImage {
        var target: CinderVolumeImage
        if let store = loc.store, let p = stores[store] {
            target = CinderVolumeImage(pool: p, volumeID: loc.volumeID, via: "[cinder_stores] \(store) = \(p)")
        } else {
            guard let cinder else {
                throw Refused("the Cinder API is not configured and [cinder_stores] does not name store '\(loc.store ?? "")'")
            }
            let volume: CinderVolume
            do {
                volume = try await cinder.volume(loc.volumeID)
            } catch {
                throw Refused("the Cinder API did not answer for the volume (\(error)); set [cinder_stores] or check [cinder]")
            }
            guard volume.metadata["glance_image_id"] == image.id || volume.name == "image-\(image.id)" else {
                throw Refused("volume \(volume.id) is not Glance's volume of image \(image.id) (name \(volume.name ?? "none"))")
            }
            guard ["available", "in-use"].contains(volume.status) else {
                throw Refused("volume \(volume.id) is \(volume.status)")
            }
            guard let host = volume.host else {
                throw Refused("Cinder hides the volume's back end from this agent's user (os-vol-host-attr:host is admin-only); "
                              + "name its pool in [cinder_stores]")
            }
            let pools: [CinderPool]
            do {
                pools = try await cinder.pools()
            } catch {
                throw Refused("cannot list Cinder's pools (\(error)); name the pool in [cinder_stores]")
            }
            guard let backend = pools.first(where: { $0.name == host }), let rbd = backend.rbd else {
                throw Refused("Cinder's back end \(host) is not an RBD pool")
            }
            let fsid = try await pool.run(.calls) { try $0.cluster.fsid() }
            guard rbd.fsid.lowercased() == fsid.lowercased() else {
                throw Refused("Cinder's back end \(host) is another Ceph cluster (fsid \(rbd.fsid))")
            }
            target = CinderVolumeImage(pool: rbd.pool, volumeID: loc.volumeID, via: "Cinder back end \(host)")
        }
        let size = image.size ?? 0
        let found = target
        let volumeSize: UInt64
        do {
            volumeSize = try await pool.run(.calls) { io in
                let v = try io.cluster.ioContext(pool: found.pool).openImage(found.image, readOnly: true)
                defer { v.close() }
                return try v.stat().size
            }
        } catch {
            throw Refused("cannot open \(found) with this agent's cephx user (\(error)); it needs `profile rbd-read-only pool=\(found.pool)`")
        }
        guard volumeSize >= size, size > 0 else {
            throw Refused("\(found) holds \(volumeSize) bytes, less than the image's \(size)")
        }
        target.via += ", \(volumeSize >> 20) MiB volume"
        return target
    }
}
