import Dispatch
import Synchronization

/// One rate shared by every download that takes from it: `[prefetch] bandwidth_limit` bounds the node's prefetch
/// traffic as a whole, however many prefetches run at once (a limit per download let `concurrency` downloads take
/// `concurrency` times the limit).
///
/// Pacing on a shared clock: each block received reserves the next free slot of the link, `bytes / rate` long,
/// and its download waits until that slot ends, so no download has more than its one block ahead of what the
/// rate allows and N blocks take at least N slots however many downloads share them (waiting only for the slot's
/// start let each of `concurrency` downloads run a block ahead: measured, 10 MiB/s through a limit of 8). Idle
/// time is not banked: after a pause the traffic resumes at the rate.
public final class BandwidthLimit: Sendable {
    public let bytesPerSecond: UInt64
    /// When the link is next free, in uptime nanoseconds.
    private let nextFree = Mutex<UInt64>(0)

    public init(bytesPerSecond: UInt64) {
        precondition(bytesPerSecond > 0, "a bandwidth limit must be positive")
        self.bytesPerSecond = bytesPerSecond
    }

    /// Accounts for `bytes` just received and waits until the shared rate has paid for them. Cancellable.
    public func take(_ bytes: Int) async throws {
        guard bytes > 0 else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        let cost = UInt64((Double(bytes) / Double(bytesPerSecond) * 1e9).rounded(.up))
        let end = nextFree.withLock { free -> UInt64 in
            free = max(free, now) + cost
            return free
        }
        try await Task.sleep(nanoseconds: end - now)
    }
}
