import Foundation
import GRDB

/// One image in the node cache, as the index records it (and as the control API shows it).
public struct CachedImage: Codable, Sendable, Equatable, FetchableRecord, PersistableRecord {
    public static let databaseTableName = "images"

    public enum State: String, Codable, Sendable {
        case queued, fetching, verifying, converting, ready, error
        /// It was ready, but its file disappeared (deleted outside the agent): fetched again on its next use.
        case missing
    }

    public var id: String
    public var name: String?
    /// What Glance declares.
    public var diskFormat: String
    /// What is on disk (raw after force_raw).
    public var storedFormat: String?
    public var size: UInt64?
    public var virtualSize: UInt64?
    public var osHashAlgo: String?
    public var osHashValue: String?
    public var checksum: String?
    public var state: State
    public var bytesDone: UInt64
    public var bytesTotal: UInt64?
    /// Bytes the file occupies on disk (allocated blocks); what counts against max_size.
    public var diskBytes: UInt64
    public var path: String?
    public var error: String?
    public var pinned: Bool
    public var useCount: Int
    public var lastUsed: Double
    public var createdAt: Double
    public var verifiedAt: Double?
    /// The hash of the file as it was downloaded (`os_hash_algo`'s algorithm when Glance has one, else sha512),
    /// computed in the same pass: what a scrub compares with when Glance has no hash.
    public var recordedHashAlgo: String?
    public var recordedHash: String?
    /// The Glance stores that held the image when it was fetched (multi-store Glance's `stores`).
    public var stores: [String]?

    enum CodingKeys: String, CodingKey {
        case id, name, diskFormat = "disk_format", storedFormat = "stored_format", size, virtualSize = "virtual_size"
        case osHashAlgo = "os_hash_algo", osHashValue = "os_hash_value", checksum, state, bytesDone = "bytes_done"
        case bytesTotal = "bytes_total", diskBytes = "disk_bytes", path, error, pinned, useCount = "use_count"
        case lastUsed = "last_used", createdAt = "created_at", verifiedAt = "verified_at"
        case recordedHashAlgo = "recorded_hash_algo", recordedHash = "recorded_hash", stores
    }

    /// True when the file holds the bytes exactly as Glance stores them (not converted by force_raw), so Glance's
    /// size and hashes describe it.
    public var storedAsDownloaded: Bool {
        storedFormat == CacheError.declaredFormat(diskFormat: diskFormat, containerFormat: nil)?.rawValue
    }

    public init(id: String, diskFormat: String, state: State = .queued) {
        self.id = id
        self.diskFormat = diskFormat
        self.state = state
        bytesDone = 0
        diskBytes = 0
        pinned = false
        useCount = 0
        let now = Date().timeIntervalSince1970
        lastUsed = now
        createdAt = now
    }
}

/// The persistent index of the cache (SQLite through GRDB). Every write is a transaction, so a kill -9 leaves
/// either the old row or the new one. Every call blocks (SQLite commits fsync): the agent reaches it only through
/// `CacheCatalog`, which keeps the rows in memory and writes them on its own thread.
public final class CacheIndex: Sendable {
    let db: DatabaseQueue

    public init(path: String) throws {
        var config = Configuration()
        config.busyMode = .timeout(5)
        db = try DatabaseQueue(path: path, configuration: config)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "images") { t in
                t.primaryKey("id", .text)
                t.column("name", .text)
                t.column("disk_format", .text).notNull()
                t.column("stored_format", .text)
                t.column("size", .integer)
                t.column("virtual_size", .integer)
                t.column("os_hash_algo", .text)
                t.column("os_hash_value", .text)
                t.column("checksum", .text)
                t.column("state", .text).notNull()
                t.column("bytes_done", .integer).notNull()
                t.column("bytes_total", .integer)
                t.column("disk_bytes", .integer).notNull()
                t.column("path", .text)
                t.column("error", .text)
                t.column("pinned", .boolean).notNull()
                t.column("use_count", .integer).notNull()
                t.column("last_used", .double).notNull()
                t.column("created_at", .double).notNull()
                t.column("verified_at", .double)
            }
        }
        migrator.registerMigration("v2 recorded hash") { db in
            try db.alter(table: "images") { t in
                t.add(column: "recorded_hash_algo", .text)
                t.add(column: "recorded_hash", .text)
            }
        }
        migrator.registerMigration("v3 stores") { db in
            try db.alter(table: "images") { t in
                t.add(column: "stores", .text)  // a JSON array
            }
        }
        try migrator.migrate(db)
    }

    public func get(_ id: String) throws -> CachedImage? {
        try db.read { try CachedImage.fetchOne($0, key: id) }
    }

    public func all() throws -> [CachedImage] {
        try db.read { try CachedImage.order(Column("last_used").desc).fetchAll($0) }
    }

    public func save(_ image: CachedImage) throws {
        try db.write { try image.save($0) }
    }

    public func remove(_ id: String) throws {
        _ = try db.write { try CachedImage.deleteOne($0, key: id) }
    }

    /// Ready images, least recently used first: the eviction order.
    public func evictionOrder() throws -> [CachedImage] {
        try db.read {
            try CachedImage.filter(Column("state") == CachedImage.State.ready.rawValue)
                .order(Column("last_used").asc).fetchAll($0)
        }
    }

    public func totalDiskBytes() throws -> UInt64 {
        try db.read { UInt64(try Int64.fetchOne($0, sql: "SELECT COALESCE(SUM(disk_bytes), 0) FROM images") ?? 0) }
    }
}
