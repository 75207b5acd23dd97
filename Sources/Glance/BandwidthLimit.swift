import Dispatch
import Synchronization

/// One rate shared by every download that takes from it: `[prefetch] bandwidth_limit` bounds the node's prefetch
/// traffic as a whole, however many prefetches run at once (a limit per download let `concurrency` downloads take
/// `concurrency` times the limit).
///
/// Pacing on a shared clock: each block received reserves the next free slot of the link, `bytes / rate` long,
/// and its download waits until that slot starts. Idle time is not banked, so after a pause the traffic resumes at
/// the rate, never in a burst larger than one block per download.
public final class BandwidthLimit: Sendable {
    public let bytesPerSecond: UInt64
    /// When the link is next free, in uptime nanoseconds.
    private let nextFree = Mutex<UInt64>(0)

    public init(bytesPerSecond: UInt64) {
        precondition(bytesPerSecond > 0, "a bandwidth limit must be positive")
        self.bytesPerSecond = bytesPerSecond
    }

    /// Accounts for `bytes` just received and waits until the shared rate allows them. Cancellable.
    public func take(_ bytes: Int) async throws {
        guard bytes > 0 else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        let cost = UInt64((Double(bytes) / Double(bytesPerSecond) * 1e9).rounded(.up))
        let start = nextFree.withLock { free -> UInt64 in
            let start = max(free, now)
            free = start + cost
            return start
        }
        if start > now { try await Task.sleep(nanoseconds: start - now) }
    }
}
