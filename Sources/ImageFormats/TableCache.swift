import Synchronization

/// A bounded, thread-safe LRU of decoded metadata tables (qcow2 L2 tables, VMDK grain tables, VHD bitmaps),
/// keyed by host offset. Memory stays under `capacityBytes` whatever the image size.
final class TableCache<Table: Sendable>: Sendable {
    private struct State {
        var entries: [UInt64: (table: Table, tick: UInt64)] = [:]
        var tick: UInt64 = 0
    }
    private let state = Mutex(State())
    private let maxEntries: Int

    /// `tableBytes` is the size of one table; at least 4 tables are kept whatever the budget.
    init(capacityBytes: Int, tableBytes: Int) {
        maxEntries = max(4, capacityBytes / max(1, tableBytes))
    }

    /// The table at `offset`, loading it with `load` on a miss (outside the lock, so a slow read does not
    /// block readers of other tables).
    func table(at offset: UInt64, load: () throws -> Table) rethrows -> Table {
        let hit: Table? = state.withLock { s in
            s.tick += 1
            guard var e = s.entries[offset] else { return nil }
            e.tick = s.tick
            s.entries[offset] = e
            return e.table
        }
        if let hit { return hit }
        let loaded = try load()
        state.withLock { s in
            if s.entries.count >= maxEntries, let victim = s.entries.min(by: { $0.value.tick < $1.value.tick })?.key {
                s.entries.removeValue(forKey: victim)
            }
            s.tick += 1
            s.entries[offset] = (loaded, s.tick)
        }
        return loaded
    }
}
