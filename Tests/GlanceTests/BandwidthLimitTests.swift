import Dispatch
import Testing
@testable import Glance

/// `[prefetch] bandwidth_limit` is one rate for all prefetches together, not one per download.
@Suite("bandwidth limit")
struct BandwidthLimitTests {
    static func seconds(since t0: UInt64) -> Double { Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9 }

    @Test func fourDownloadsShareOneRate() async throws {
        // 4 downloads of 8 blocks of 1 MiB at 16 MiB/s in all: 32 MiB take about 2 s together. A limit per
        // download would let them finish in 0.5 s.
        let limit = BandwidthLimit(bytesPerSecond: 16 << 20)
        let t0 = DispatchTime.now().uptimeNanoseconds
        let ends = try await withThrowingTaskGroup(of: Double.self) { g in
            for _ in 0..<4 {
                g.addTask {
                    for _ in 0..<8 { try await limit.take(1 << 20) }
                    return Self.seconds(since: t0)
                }
            }
            return try await g.reduce(into: [Double]()) { $0.append($1) }
        }
        let total = ends.max()!
        // The last block's slot ends at 32/16 s, and a download waits for the end of its block's slot (waiting for
        // the start let each download run a block ahead: 31/16 s here).
        #expect(total >= 1.99, "32 MiB at 16 MiB/s took \(total) s")
        // Only a hang guard (the suite runs in the serial group: in the parallel one, sleeps woke 9 and 63 s late).
        #expect(total < 60, "\(total) s")
        // Fair: no download finished long before the others (slots are handed out in arrival order).
        #expect(ends.min()! >= 1.5, "\(ends)")
    }

    @Test func idleTimeIsNotBankedAndOneDownloadGetsTheWholeRate() async throws {
        let limit = BandwidthLimit(bytesPerSecond: 32 << 20)
        try await limit.take(1 << 20)
        try await Task.sleep(nanoseconds: 300_000_000)
        // After the pause: 16 MiB at 32 MiB/s, at least 16/32 s. Had the 0.3 s pause been banked (9.6 MiB of
        // credit), it would take about 0.2 s. The upper bound is a hang guard.
        let t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<16 { try await limit.take(1 << 20) }
        let took = Self.seconds(since: t0)
        #expect(took >= 0.49 && took < 60, "\(took) s")
    }

    @Test func aWaitingDownloadIsCancellable() async throws {
        let limit = BandwidthLimit(bytesPerSecond: 1 << 20)
        let first = Task { try await limit.take(64 << 20) }  // the link is now busy for 64 s
        try await Task.sleep(nanoseconds: 50_000_000)
        let second = Task { try await limit.take(1 << 20) }
        try await Task.sleep(nanoseconds: 50_000_000)
        first.cancel()
        second.cancel()
        await #expect(throws: CancellationError.self) { try await first.value }
        await #expect(throws: CancellationError.self) { try await second.value }
    }
}
