import Foundation
import Glance
import Logging
import RBD
import Synchronization
import SystemIO

/// The copy-to-store path: a raw image that Glance keeps in no rbd store of this cluster is first copied by
/// Glance into one (`[glance] copy_to_store`, Glance's copy-image import), and the disk is a clone of the copy.
/// Nova's `images_rbd_glance_store_name` does the same, but reads the import's status from the wrong place and
/// notices a failure only at its timeout; here the top-level comma-separated strings Glance really writes are
/// read (`stores`, `os_glance_importing_to_stores`, `os_glance_failed_import`).
///
/// One copy request per image, however many agents ask: in this process one task per image, and across the
/// cluster a RADOS lock with a duration (`imgconv-copy.<image_id>` in the disks pool) that only the agent that
/// sends the import holds; the others poll the image. Glance's own import lock answers a second import with 409,
/// which is polled the same way.
///
/// Whatever goes wrong (the policy refuses the user, the copy fails, it times out, the copy's location is not
/// visible to this user or not in this cluster) is an `outcome` with the reason, and the caller builds the
/// shared base instead.
final class StoreCopier: Sendable {
    let pool: RBDPool
    let store: String
    let timeout: Double
    let pollInterval: Double
    let logger: Logger
    private let running = Mutex<[String: Task<Outcome, Never>]>([:])

    enum Outcome: Sendable, Equatable {
        /// The image is in the store: clone this location.
        case copied(GlanceRBDLocation)
        /// The copy did not happen or cannot be used: why, for the disk's JSON and the log.
        case fallback(String)
    }

    init(pool: RBDPool, store: String, timeout: Double, pollInterval: Double = 1, logger: Logger) {
        self.pool = pool
        self.store = store
        self.timeout = timeout
        self.pollInterval = pollInterval
        self.logger = logger
    }

    /// Copies `image` into the store (or joins the copy this process already runs) and returns where to clone.
    func copy(_ image: GlanceImage, glance: GlanceClient) async -> Outcome {
        let task = running.withLock { tasks -> Task<Outcome, Never> in
            if let t = tasks[image.id] { return t }
            let t = Task { await self.run(image, glance: glance) }
            tasks[image.id] = t
            return t
        }
        let outcome = await withTaskCancellationHandler { await task.value } onCancel: { task.cancel() }
        running.withLock { tasks in if tasks[image.id] == task { tasks[image.id] = nil } }
        return outcome
    }

    private func run(_ image: GlanceImage, glance: GlanceClient) async -> Outcome {
        let started = ContinuousClock.now
        let object = "imgconv-copy.\(image.id)", cookie = UUID().uuidString.lowercased()
        let seconds = Int(timeout.rounded(.up))
        let store = self.store
        do {
            // Only the holder of the lock sends the import; it keeps the lock (never renewed) until the copy ends
            // or `timeout` passes, so agents that ask later poll instead of asking again.
            let holder = try await pool.run(.calls) { io in
                try io.lease(object: object, name: "copy", cookie: cookie, description: "copy-image to \(store)",
                             seconds: seconds, renew: false)
            }
            defer {
                if holder { Task { [pool] in try? await pool.run(.calls) { try $0.releaseLease(object: object, name: "copy", cookie: cookie) } } }
            }
            if holder {
                switch try await glance.copyImage(image.id, to: [store]) {
                case .accepted:
                    logger.info("asked Glance to copy the image", metadata: ["image": "\(image.id)", "store": "\(store)"])
                case .alreadyPresent:
                    return try await location(image.id, glance: glance)
                case let .busy(detail):
                    logger.info("another import of the image runs; waiting for it", metadata: ["image": "\(image.id)", "detail": "\(detail)"])
                case let .forbidden(detail):
                    return .fallback("Glance refused to copy the image to \(store): 403, its policy copy_image (admin-only by default) does not allow this agent's user (\(detail))")
                case let .refused(status, detail):
                    return .fallback("Glance refused to copy the image to \(store): HTTP \(status) \(detail)")
                }
            }
            // Glance's copy of a small image takes a second or two: poll often at first, then every pollInterval.
            var interval = min(0.2, pollInterval)
            while started.duration(to: .now) < .seconds(timeout) {
                let now = try await glance.show(image.id)
                if now.failedImportStores.contains(store) {
                    return .fallback("Glance's copy of the image to \(store) failed (os_glance_failed_import = \(now.failedImportStores.joined(separator: ",")))")
                }
                if now.stores.contains(store) && !now.importingToStores.contains(store) {
                    logger.info("the image is in the store", metadata: ["image": "\(image.id)", "store": "\(store)",
                                                                        "seconds": "\(started.duration(to: .now).seconds)"])
                    return try await location(image.id, glance: glance, shown: now)
                }
                try await Task.sleep(for: .seconds(interval))
                interval = min(interval * 2, pollInterval)
            }
            return .fallback("Glance's copy of the image to \(store) did not finish within copy_timeout (\(Int(timeout)) s)")
        } catch is CancellationError {
            return .fallback("cancelled")
        } catch {
            return .fallback("copy-image to \(store) failed: \(error)")
        }
    }

    /// The copy's rbd location: from the image (`show_multiple_locations`, `show_image_direct_url`), else from
    /// `GET /v2/images/{id}/locations` (the service role, Glance 29+). It must be in this cluster.
    func location(_ id: String, glance: GlanceClient, shown: GlanceImage? = nil) async throws -> Outcome {
        let image: GlanceImage
        if let shown { image = shown } else { image = try await glance.show(id) }
        var candidates = image.locations.filter { image.locationStores[$0] == store || image.locationStores[$0] == nil }
        if candidates.compactMap(GlanceRBDLocation.init).isEmpty, let listed = try await glance.locations(id) {
            candidates = listed.filter { $0.store == store || $0.store == nil }.map(\.url)
        }
        let rbd = candidates.compactMap(GlanceRBDLocation.init)
        guard !rbd.isEmpty else {
            return .fallback("the image is in \(store), but its location is not visible to this agent's user: set Glance's "
                + "show_image_direct_url (or show_multiple_locations), or give the user the service role for GET /v2/images/{id}/locations")
        }
        let fsid = try await pool.run(.calls) { try $0.cluster.fsid() }
        guard let here = rbd.first(where: { $0.fsid.lowercased() == fsid.lowercased() }) else {
            return .fallback("store \(store) keeps the image in another Ceph cluster (\(rbd[0].fsid)), not this one (\(fsid))")
        }
        return .copied(here)
    }
}
