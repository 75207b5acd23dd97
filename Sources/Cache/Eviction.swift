import SystemIO

/// Which cached images to remove so another fits (kubelet's image GC, for one node's cache): least recently used
/// first, never a pinned image, one in use, one being fetched, or the image asking for room. Pure: the cache
/// decides with its own state, then removes the files off the actor.
struct EvictionPlan: Equatable {
    /// Rows to remove, in order.
    var victims: [CachedImage]

    /// - Parameters:
    ///   - needed: bytes the image asking for room needs (its reservation).
    ///   - used: bytes the cached files occupy now.
    ///   - reservedByOthers: bytes other running fetches have reserved.
    ///   - freeBytes: free space on the cache's file system, when `minFree` applies.
    static func make(needed: UInt64, alreadyReserved: UInt64, used: UInt64, reservedByOthers: UInt64, maxSize: UInt64,
                     minFree: UInt64, freeBytes: UInt64?, candidates: [CachedImage]) -> EvictionPlan? {
        var victims: [CachedImage] = []
        var used = used
        var freed: UInt64 = 0
        func fits() -> Bool {
            guard used + reservedByOthers + needed <= maxSize else { return false }
            if minFree > 0, let free = freeBytes {
                // Space this fetch has not reserved yet must come out of the free space, above min_free.
                let pending = needed > alreadyReserved ? needed - alreadyReserved : 0
                return free + freed >= pending + minFree
            }
            return true
        }
        var rest = candidates[...]
        while !fits() {
            guard let victim = rest.popFirst() else { return nil }
            victims.append(victim)
            used -= min(used, victim.diskBytes)
            freed += victim.diskBytes
        }
        return EvictionPlan(victims: victims)
    }
}
