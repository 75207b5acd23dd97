import Foundation
import Logging
import RBD
import SystemIO

/// Removes shared bases nobody needs: no clones, unused for `idleSeconds` (GC counts idleness from the build or
/// the last disk's removal; while a base has clones it is never idle), and `.part-` leftovers of builders that
/// died. A base is looked at only under its image's build lease, so GC never races a builder; taking the lease
/// from a builder that stopped renewing fences it (`BuildLease`), as a new builder would.
struct BaseGC: Sendable {
    let pool: RBDPool
    let logger: Logger

    func collect(idleSeconds: Double, images: Set<String>?) async throws -> [String] {
        let settings = pool.settings, logger = self.logger
        return try await pool.run(.jobs) { io in
            var removed: [String] = []
            let now = Date().timeIntervalSince1970
            for name in try io.listImages() where name.hasPrefix(settings.basePrefix) {
                let isPart = name.contains(".part-")
                let imageID = String(name.dropFirst(settings.basePrefix.count).prefix(36))
                if let images, !images.contains(imageID) { continue }
                guard let lease = try? BuildLease.acquire(io: io, object: settings.leaseObject(imageID), seconds: settings.leaseSeconds,
                                                          description: "imgconv gc", record: false,
                                                          fenceSeconds: settings.fenceSeconds, logger: logger) else { continue }
                defer { lease.release() }
                do {
                    if !isPart {
                        let atSnap = try io.openImage(name, snapshot: settings.snapshot)
                        let children = try atSnap.children()
                        atSnap.close()
                        guard children.isEmpty else { continue }
                        let img = try io.openImage(name, readOnly: true)
                        let lastUsed = Double(try img.metadata("imgconv.last_used") ?? "0") ?? 0
                        img.close()
                        guard now - lastUsed >= idleSeconds else { continue }
                        // Waiters must stop reading it as ready before it goes.
                        guard try lease.set(BaseBuilder.readyKey, nil) else { continue }
                    }
                    try BaseBuilder.removeWithSnapshots(io, name)
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
