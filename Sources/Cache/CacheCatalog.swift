import Dispatch
import Logging
import Synchronization

/// The index as the agent uses it: every row in memory, so a query never blocks, and writes persisted to SQLite in
/// order on the index's own thread (write-behind), so no commit's fsync runs on the cache actor or the cooperative
/// pool.
///
/// A kill -9 can lose the last writes still queued. That is safe: start-up (`ImageCache.reconcile`) drops rows that
/// never became ready and rows whose file is gone, and leaves files it has no row for alone; a file is published
/// (renamed into place) before its row says ready, never after.
final class CacheCatalog: Sendable {
    private let rows: Mutex<[String: CachedImage]>
    let store: CacheIndex
    private let writer = DispatchQueue(label: "imgconv.cache.index")
    private let logger: Logger

    /// Loads every row (blocking: call it off actors, at start-up).
    init(store: CacheIndex, logger: Logger) throws {
        self.store = store
        self.logger = logger
        rows = Mutex(Dictionary(uniqueKeysWithValues: try store.all().map { ($0.id, $0) }))
    }

    func get(_ id: String) -> CachedImage? { rows.withLock { $0[id] } }

    /// Every row, most recently used first.
    func all() -> [CachedImage] { rows.withLock { Array($0.values) }.sorted { $0.lastUsed > $1.lastUsed } }

    /// Ready rows, least recently used first: the eviction order.
    func evictionOrder() -> [CachedImage] {
        rows.withLock { $0.values.filter { $0.state == .ready } }.sorted { $0.lastUsed < $1.lastUsed }
    }

    /// Bytes the cached files occupy (what counts against max_size).
    func totalDiskBytes() -> UInt64 { rows.withLock { $0.values.reduce(0) { $0 + $1.diskBytes } } }

    func save(_ row: CachedImage) {
        rows.withLock { $0[row.id] = row }
        persist { try $0.save(row) }
    }

    func remove(_ id: String) {
        rows.withLock { $0[id] = nil }
        persist { try $0.remove(id) }
    }

    private func persist(_ write: @escaping @Sendable (CacheIndex) throws -> Void) {
        let store = self.store, logger = self.logger
        writer.async {
            do { try write(store) } catch {
                // The row stays right in memory; start-up reconciles whatever the file holds.
                logger.error("cannot write the cache index", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Waits until every write queued so far is in SQLite (shutdown; tests).
    func flush() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in writer.async { c.resume() } }
    }
}
