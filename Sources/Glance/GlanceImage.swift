import Foundation

/// The fields of a Glance v2 image record that the agent uses. Extra properties (Glance puts them at the top
/// level) are kept as strings so a prefetch rule can match them.
public struct GlanceImage: Sendable, Equatable, Codable {
    public var id: String
    public var name: String?
    public var status: String
    public var diskFormat: String?
    public var containerFormat: String?
    public var size: UInt64?
    public var virtualSize: UInt64?
    public var checksum: String?
    public var osHashAlgo: String?
    public var osHashValue: String?
    public var tags: [String]
    /// `locations[].url` plus `direct_url`, as shown when the deployment exposes them.
    public var locations: [String]
    /// The store of each location whose metadata names one (`locations[].metadata.store`), by URL.
    public var locationStores: [String: String]
    /// The stores that hold the image (multi-store Glance's `stores`, a comma-separated string), in Glance's order.
    public var stores: [String]
    public var properties: [String: String]

    public init(id: String, name: String? = nil, status: String = "active", diskFormat: String? = nil,
                containerFormat: String? = nil, size: UInt64? = nil, virtualSize: UInt64? = nil, checksum: String? = nil,
                osHashAlgo: String? = nil, osHashValue: String? = nil, tags: [String] = [], locations: [String] = [],
                locationStores: [String: String] = [:], stores: [String] = [], properties: [String: String] = [:]) {
        self.id = id
        self.name = name
        self.status = status
        self.diskFormat = diskFormat
        self.containerFormat = containerFormat
        self.size = size
        self.virtualSize = virtualSize
        self.checksum = checksum
        self.osHashAlgo = osHashAlgo
        self.osHashValue = osHashValue
        self.tags = tags
        self.locations = locations
        self.locationStores = locationStores
        self.stores = stores
        self.properties = properties
    }

    static let knownKeys: Set<String> = [
        "id", "name", "status", "disk_format", "container_format", "size", "virtual_size", "checksum", "os_hash_algo",
        "os_hash_value", "tags", "locations", "direct_url", "self", "file", "schema", "created_at", "updated_at",
        "visibility", "protected", "min_ram", "min_disk", "owner", "os_hidden", "stores",
    ]

    /// Parses one image object of the v2 API.
    public init(json o: [String: Any]) throws {
        guard let id = o["id"] as? String else { throw GlanceError.malformedResponse(url: "image", detail: "no id") }
        func u64(_ k: String) -> UInt64? { (o[k] as? NSNumber).flatMap { $0.int64Value >= 0 ? UInt64($0.int64Value) : nil } }
        let shown = (o["locations"] as? [[String: Any]]) ?? []
        var locations = shown.compactMap { $0["url"] as? String }
        var locationStores: [String: String] = [:]
        for l in shown {
            if let url = l["url"] as? String, let store = (l["metadata"] as? [String: Any])?["store"] as? String { locationStores[url] = store }
        }
        if let d = o["direct_url"] as? String, !locations.contains(d) { locations.append(d) }
        var props: [String: String] = [:]
        for (k, v) in o where !Self.knownKeys.contains(k) {
            switch v {
            case let s as String: props[k] = s
            case let n as NSNumber: props[k] = n.stringValue
            default: continue
            }
        }
        self.init(id: id, name: o["name"] as? String, status: (o["status"] as? String) ?? "unknown",
                  diskFormat: o["disk_format"] as? String, containerFormat: o["container_format"] as? String,
                  size: u64("size"), virtualSize: u64("virtual_size"), checksum: o["checksum"] as? String,
                  osHashAlgo: o["os_hash_algo"] as? String, osHashValue: o["os_hash_value"] as? String,
                  tags: (o["tags"] as? [String]) ?? [], locations: locations, locationStores: locationStores,
                  stores: Self.storeList(o["stores"]), properties: props)
    }

    /// Glance writes `stores` (and `os_glance_importing_to_stores`, `os_glance_failed_import`) as one
    /// comma-separated string; a list is accepted too.
    public static func storeList(_ value: Any?) -> [String] {
        let items: [String]
        switch value {
        case let s as String: items = s.split(separator: ",").map(String.init)
        case let a as [Any]: items = a.compactMap { $0 as? String }
        default: items = []
        }
        return items.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    /// Stores a copy-image import is still copying to (`os_glance_importing_to_stores`).
    public var importingToStores: [String] { Self.storeList(properties["os_glance_importing_to_stores"]) }
    /// Stores a copy-image import failed for (`os_glance_failed_import`).
    public var failedImportStores: [String] { Self.storeList(properties["os_glance_failed_import"]) }

    /// True when a property is set to a true value, as Glance and Nova spell booleans.
    public func propertyIsTrue(_ key: String) -> Bool {
        guard let v = properties[key]?.lowercased() else { return false }
        return ["true", "yes", "1", "on"].contains(v)
    }
}

/// Image ids are UUIDs in Glance. Anything else is refused before it reaches a URL or a path.
public enum ImageID {
    /// The canonical form of an id given at an edge (the control API, the config file): lower case, or nil when it
    /// is not a UUID. Ids are normalised once, there; everything inside takes only canonical ids.
    public static func normalized(_ s: String) -> String? {
        isValid(s) ? s.lowercased() : nil
    }

    /// A UUID in lower case, as Glance writes ids and as the cache names files.
    public static func isCanonical(_ s: String) -> Bool {
        isValid(s) && !s.utf8.contains { $0 >= 65 && $0 <= 70 }
    }

    public static func isValid(_ s: String) -> Bool {
        let u = Array(s.utf8)
        guard u.count == 36 else { return false }
        for (i, c) in u.enumerated() {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                if c != UInt8(ascii: "-") { return false }
            } else if !((c >= 48 && c <= 57) || (c >= 97 && c <= 102) || (c >= 65 && c <= 70)) {
                return false
            }
        }
        return true
    }
}
