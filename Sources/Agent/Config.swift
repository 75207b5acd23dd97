import Cache
import Foundation
import Glance

/// A configuration error names the file, the line, the section and key, and what is wrong.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The agent's configuration: an INI file in nova.conf style. Every key is checked at start-up: an unknown
/// section or key, or a bad value, stops the agent with a message naming it.
public struct AgentConfig: Sendable {
    public struct AgentSection: Sendable {
        public var socketPath = "/run/imgconv/agent.sock"
        public var socketMode: UInt16 = 0o660
        public var socketGroup: String?
        public var allowedUIDs: [UInt32] = []
        public var allowedGIDs: [UInt32] = []
        public var stateDir = "/var/lib/imgconv"
        /// Seconds of (almost) no CPU after which freed memory goes back to the system; 0: never.
        public var memoryTrimIdle: Double = 10
        /// With the idle trim, also hand back the resident pages of the executable's and libraries' code
        /// (`Residency.pageOut`).
        public var memoryTrimCode = true
        /// A connection that sends nothing (and is not being answered: event streams are exempt) this long is
        /// closed.
        public var idleTimeout: Double = 60
        /// Open connections one peer uid may hold; more are answered 503 and closed.
        public var maxConnectionsPerUID = 64
    }
    public enum AuthType: String, Sendable { case password, v3applicationcredential, none }
    public struct GlanceSection: Sendable {
        public var apiServers: [String] = []
        public var authType: AuthType = .password
        public var authURL: String?
        public var username: String?
        public var password: String?
        public var projectName: String?
        public var userDomainName = "Default"
        public var projectDomainName = "Default"
        public var applicationCredentialID: String?
        public var applicationCredentialSecret: String?
        public var regionName: String?
        public var interface = "public"
        public var verifyHash = true
        public var retries = 5
        /// Stores Glance should read images from first (`?prefer=`, Glance 33+ with several stores).
        public var preferStores: [String] = []
        /// A local rbd store Glance copies raw images into before they are cloned (copy-image; nil: never).
        public var copyToStore: String?
        public var copyTimeout: Double = 600
        /// Seconds Glance may send nothing before a request fails and a download resumes (a store that died
        /// mid-stream can leave Glance's response open but silent).
        public var readTimeout: Double = 120
    }
    public struct CacheSection: Sendable {
        public var directory: String?
        public var maxSize: UInt64 = 50 << 30
        public var minFree: UInt64 = 0
        public var layout: CacheConfig.Layout = .nova
        public var forceRaw = false
        public var scrubInterval: Double = 0
        public var checkInterval: Double = 60
    }
    public struct PrefetchSection: Sendable {
        public var images: [String] = []
        public var property: String?
        public var tag: String?
        public var interval: Double = 600
        public var concurrency = 2
        public var bandwidthLimit: UInt64?
    }

    /// `[rbd]`: instance disks as RBD clones. Absent: the local qcow2-overlay backend.
    public struct RBDSection: Sendable {
        public var pool = "vms"
        public var cephConf: String?
        public var user = "admin"
        public var keyring: String?
        public var connectTimeout = 10
        public var lease: Double = 30
        public var baseWait: Double = 3600
        /// Nova's own file: `[libvirt] images_rbd_pool, images_rbd_ceph_conf, rbd_user` and `[glance]` fill
        /// whatever this file does not set.
        public var novaConf: String?
    }
    /// `[disks]`: both backends.
    /// `[cinder]`: Glance's cinder stores on this Ceph cluster (`cinder-clone`). Credentials are `[glance]`'s.
    public struct CinderSection: Sendable {
        public var enabled = true
        public var endpointOverride: String?
        public var timeout: Double = 15
        /// `[cinder_stores]`: Glance cinder store id → RBD pool of its back end.
        public var stores: [String: String] = [:]
    }
    public struct DisksSection: Sendable {
        /// Local backend: where `<instance_uuid>/disk` overlays go (Nova's instances_path).
        public var instancesDir: String?
        /// Bases with no children unused this long are removed (0: never).
        public var gcIdle: Double = 86400
        /// How often the agent looks for such bases (0: never).
        public var gcInterval: Double = 3600
        /// The largest disk a request may ask for (`size`), default the largest virtual size imgconv reads.
        public var maxSize: UInt64 = 64 << 40
    }

    public var agent = AgentSection()
    public var glance = GlanceSection()
    public var cache = CacheSection()
    public var prefetch = PrefetchSection()
    public var rbd: RBDSection?
    public var disks = DisksSection()
    public var cinder = CinderSection()

    public init() {}

    public var cacheDirectory: String { cache.directory ?? agent.stateDir + "/cache" }
    public var instancesDirectory: String { disks.instancesDir ?? agent.stateDir + "/instances" }

    public static func load(path: String) throws -> AgentConfig {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigError("cannot read config file '\(path)'")
        }
        return try parse(text, name: path)
    }

    /// Parses INI text: `[section]`, `key = value`, `#` and `;` comments.
    public static func parse(_ text: String, name: String = "config") throws -> AgentConfig {
        var c = AgentConfig()
        var section: String?
        var seen: Set<String> = []
        for (n, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.trimmingCharacters(in: .whitespaces)
            let at = "\(name):\(n + 1)"
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]") else { throw ConfigError("\(at): malformed section header '\(line)'") }
                let s = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                guard ["agent", "glance", "cache", "prefetch", "rbd", "disks", "cinder", "cinder_stores", "DEFAULT"].contains(s) else {
                    throw ConfigError("\(at): unknown section [\(s)] (known: agent, glance, cache, prefetch, rbd, disks, cinder, cinder_stores)")
                }
                if s == "rbd" && c.rbd == nil { c.rbd = RBDSection() }
                section = s
                continue
            }
            guard let eq = line.firstIndex(of: "=") else { throw ConfigError("\(at): expected 'key = value', got '\(line)'") }
            let key = line[..<eq].trimmingCharacters(in: .whitespaces)
            let value = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            guard let s = section else { throw ConfigError("\(at): '\(key)' is outside any section") }
            let full = "[\(s)] \(key)"
            guard seen.insert(full).inserted else { throw ConfigError("\(at): \(full) is set twice") }
            do {
                try c.set(section: s, key: key, value: value)
            } catch let e as ConfigError {
                throw ConfigError("\(at): \(full): \(e.message)")
            }
        }
        if let nova = c.rbd?.novaConf { try c.applyNovaConf(nova, except: seen) }
        try c.validate()
        return c
    }

    /// Fills what this file leaves unset from Nova's nova.conf, so the agent follows the compute service's own
    /// settings: `[libvirt] images_rbd_pool`, `images_rbd_ceph_conf`, `rbd_user`, and `[glance]` (api_servers
    /// and the keystoneauth password options).
    mutating func applyNovaConf(_ path: String, except seen: Set<String>) throws {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigError("[rbd] nova_conf: cannot read '\(path)'")
        }
        var values: [String: String] = [:]
        var section = ""
        for raw in text.split(separator: "\n") {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") { section = String(line.dropFirst().dropLast()); continue }
            guard let eq = line.firstIndex(of: "=") else { continue }
            values["[\(section)] \(line[..<eq].trimmingCharacters(in: .whitespaces))"] = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
        }
        let mapping: [(nova: String, ours: (section: String, key: String))] = [
            ("[libvirt] images_rbd_pool", ("rbd", "pool")),
            ("[libvirt] images_rbd_ceph_conf", ("rbd", "ceph_conf")),
            ("[libvirt] rbd_user", ("rbd", "user")),
            ("[glance] api_servers", ("glance", "api_servers")),
            ("[glance] auth_type", ("glance", "auth_type")),
            ("[glance] auth_url", ("glance", "auth_url")),
            ("[glance] username", ("glance", "username")),
            ("[glance] password", ("glance", "password")),
            ("[glance] project_name", ("glance", "project_name")),
            ("[glance] user_domain_name", ("glance", "user_domain_name")),
            ("[glance] project_domain_name", ("glance", "project_domain_name")),
            ("[glance] region_name", ("glance", "region_name")),
            ("[glance] valid_interfaces", ("glance", "interface")),
        ]
        for (nova, ours) in mapping {
            guard var v = values[nova], !seen.contains("[\(ours.section)] \(ours.key)") else { continue }
            if ours.key == "auth_type" && v == "v3password" { v = "password" }
            do { try set(section: ours.section, key: ours.key, value: v) } catch let e as ConfigError {
                throw ConfigError("\(path): \(nova): \(e.message)")
            }
        }
    }

    mutating func set(section: String, key: String, value v: String) throws {
        switch (section, key) {
        case ("agent", "socket_path"): agent.socketPath = try Self.path(v)
        case ("agent", "socket_mode"):
            guard let m = UInt16(v.hasPrefix("0o") ? String(v.dropFirst(2)) : v, radix: 8), m <= 0o777 else {
                throw ConfigError("'\(v)' is not an octal file mode such as 0660")
            }
            agent.socketMode = m
        case ("agent", "socket_group"): agent.socketGroup = v.isEmpty ? nil : v
        case ("agent", "allowed_uids"): agent.allowedUIDs = try Self.list(v).map(Self.id)
        case ("agent", "allowed_gids"): agent.allowedGIDs = try Self.list(v).map(Self.id)
        case ("agent", "state_dir"): agent.stateDir = try Self.path(v)
        case ("agent", "memory_trim_idle"): agent.memoryTrimIdle = try Self.duration(v, zeroOr: 1...86400)
        case ("agent", "memory_trim_code"): agent.memoryTrimCode = try Self.bool(v)
        case ("agent", "idle_timeout"): agent.idleTimeout = try Self.duration(v, in: 1...86400)
        case ("agent", "max_connections_per_uid"): agent.maxConnectionsPerUID = try Self.int(v, 1...10_000)
        case ("glance", "api_servers"): glance.apiServers = try Self.list(v).map(Self.url)
        case ("glance", "auth_type"):
            guard let t = AuthType(rawValue: v) else { throw ConfigError("'\(v)' is not one of password, v3applicationcredential, none") }
            glance.authType = t
        case ("glance", "auth_url"): glance.authURL = try Self.url(v)
        case ("glance", "username"): glance.username = v
        case ("glance", "password"): glance.password = v
        case ("glance", "project_name"): glance.projectName = v
        case ("glance", "user_domain_name"): glance.userDomainName = v
        case ("glance", "project_domain_name"): glance.projectDomainName = v
        case ("glance", "application_credential_id"): glance.applicationCredentialID = v
        case ("glance", "application_credential_secret"): glance.applicationCredentialSecret = v
        case ("glance", "region_name"): glance.regionName = v.isEmpty ? nil : v
        case ("glance", "interface"), ("glance", "valid_interfaces"):
            let i = try Self.list(v).first ?? "public"
            guard ["public", "internal", "admin"].contains(i) else { throw ConfigError("'\(v)' is not public, internal or admin") }
            glance.interface = i
        case ("glance", "verify_hash"): glance.verifyHash = try Self.bool(v)
        case ("glance", "num_retries"): glance.retries = try Self.int(v, 0...100)
        case ("glance", "prefer_stores"): glance.preferStores = try Self.list(v).map(Self.token)
        case ("glance", "copy_to_store"): glance.copyToStore = v.isEmpty ? nil : try Self.token(v)
        case ("glance", "copy_timeout"): glance.copyTimeout = try Self.duration(v, in: 1...86400)
        case ("glance", "read_timeout"): glance.readTimeout = try Self.duration(v, in: 1...3600)
        case ("cache", "directory"): cache.directory = try Self.path(v)
        case ("cache", "max_size"): cache.maxSize = try Self.size(v, in: (1 << 20)...(1 << 50))
        case ("cache", "min_free"): cache.minFree = try Self.size(v, in: 0...(1 << 50))
        case ("cache", "layout"):
            guard let l = CacheConfig.Layout(rawValue: v) else { throw ConfigError("'\(v)' is not nova or id") }
            cache.layout = l
        case ("cache", "force_raw"): cache.forceRaw = try Self.bool(v)
        case ("cache", "scrub_interval"): cache.scrubInterval = try Self.duration(v, zeroOr: 60...(365 * 86400))
        case ("cache", "check_interval"): cache.checkInterval = try Self.duration(v, zeroOr: 1...86400)
        case ("prefetch", "images"):
            prefetch.images = try Self.list(v).map { id in
                guard ImageID.isValid(id) else { throw ConfigError("'\(id)' is not an image id (a UUID)") }
                return id.lowercased()
            }
        case ("prefetch", "property"): prefetch.property = v.isEmpty ? nil : try Self.token(v)
        case ("prefetch", "tag"): prefetch.tag = v.isEmpty ? nil : v
        case ("prefetch", "interval"): prefetch.interval = try Self.duration(v, in: 1...(30 * 86400))
        case ("prefetch", "concurrency"): prefetch.concurrency = try Self.int(v, 1...64)
        case ("prefetch", "bandwidth_limit"):
            let b = try Self.size(v, in: 0...(1 << 40))
            guard b == 0 || b >= 64 << 10 else { throw ConfigError("'\(v)' is below 64K (bytes per second); 0 means no limit") }
            prefetch.bandwidthLimit = b == 0 ? nil : b
        case ("rbd", "pool"): rbd!.pool = try Self.token(v)
        case ("rbd", "ceph_conf"): rbd!.cephConf = try Self.path(v)
        case ("rbd", "user"): rbd!.user = try Self.token(v.hasPrefix("client.") ? String(v.dropFirst(7)) : v)
        case ("rbd", "keyring"): rbd!.keyring = try Self.path(v)
        case ("rbd", "connect_timeout"): rbd!.connectTimeout = try Self.int(v, 1...600)
        case ("rbd", "lease"): rbd!.lease = try Self.duration(v, in: 3...3600)
        case ("rbd", "base_wait"): rbd!.baseWait = try Self.duration(v, in: 1...(7 * 86400))
        case ("rbd", "nova_conf"): rbd!.novaConf = try Self.path(v)
        case ("disks", "instances_dir"): disks.instancesDir = try Self.path(v)
        case ("disks", "gc_idle"): disks.gcIdle = try Self.duration(v, in: 0...(3650 * 86400))
        case ("disks", "gc_interval"): disks.gcInterval = try Self.duration(v, zeroOr: 1...(30 * 86400))
        case ("disks", "max_size"): disks.maxSize = try Self.size(v, in: (1 << 20)...(64 << 40))
        case ("cinder", "enabled"): cinder.enabled = try Self.bool(v)
        case ("cinder", "endpoint_override"): cinder.endpointOverride = v.isEmpty ? nil : try Self.url(v)
        case ("cinder", "timeout"): cinder.timeout = try Self.duration(v, in: 1...600)
        case ("cinder_stores", _):
            // `<Glance cinder store> = <RBD pool>`
            guard !key.isEmpty, !v.isEmpty else { throw ConfigError("expected '<Glance cinder store> = <RBD pool>'") }
            cinder.stores[try Self.token(key)] = try Self.token(v)
        default:
            throw ConfigError("unknown key")
        }
    }

    func validate() throws {
        switch glance.authType {
        case .password:
            for (k, v) in [("auth_url", glance.authURL), ("username", glance.username), ("password", glance.password),
                           ("project_name", glance.projectName)] where v == nil {
                throw ConfigError("[glance] \(k) is required with auth_type = password")
            }
        case .v3applicationcredential:
            for (k, v) in [("auth_url", glance.authURL), ("application_credential_id", glance.applicationCredentialID),
                           ("application_credential_secret", glance.applicationCredentialSecret)] where v == nil {
                throw ConfigError("[glance] \(k) is required with auth_type = v3applicationcredential")
            }
        case .none:
            if glance.apiServers.isEmpty { throw ConfigError("[glance] api_servers is required with auth_type = none") }
        }
        if cache.minFree >= cache.maxSize && cache.maxSize > 0 && cache.minFree > 0 {
            // Allowed (they limit different things) but almost certainly a typo.
        }
    }

    // MARK: value parsers

    static func list(_ v: String) throws -> [String] {
        v.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    static func bool(_ v: String) throws -> Bool {
        switch v.lowercased() {
        case "true", "yes", "on", "1": return true
        case "false", "no", "off", "0": return false
        default: throw ConfigError("'\(v)' is not a boolean (true or false)")
        }
    }

    static func int(_ v: String, _ range: ClosedRange<Int>) throws -> Int {
        guard let n = Int(v), range.contains(n) else { throw ConfigError("'\(v)' is not a whole number in \(range.lowerBound)...\(range.upperBound)") }
        return n
    }

    static func id(_ v: String) throws -> UInt32 {
        guard let n = UInt32(v) else { throw ConfigError("'\(v)' is not a numeric uid/gid") }
        return n
    }

    static func path(_ v: String) throws -> String {
        guard v.hasPrefix("/"), !v.split(separator: "/").contains("..") else { throw ConfigError("'\(v)' must be an absolute path without '..'") }
        return v
    }

    static func url(_ v: String) throws -> String {
        guard (v.hasPrefix("http://") || v.hasPrefix("https://")), URL(string: v) != nil else {
            throw ConfigError("'\(v)' is not an http(s) URL")
        }
        return v
    }

    static func token(_ v: String) throws -> String {
        guard v.allSatisfy({ $0.isLetter || $0.isNumber || "_-.:".contains($0) }) else {
            throw ConfigError("'\(v)' is not a name: only letters, digits and _ - . : are allowed")
        }
        return v
    }

    /// A size within `range`.
    static func size(_ v: String, in range: ClosedRange<UInt64>) throws -> UInt64 {
        let n = try size(v)
        guard range.contains(n) else {
            throw ConfigError("'\(v)' is out of range: \(humanBytes(range.lowerBound)) to \(humanBytes(range.upperBound))")
        }
        return n
    }

    /// A duration within `range` seconds.
    static func duration(_ v: String, in range: ClosedRange<Double>) throws -> Double {
        let d = try duration(v)
        guard range.contains(d) else {
            throw ConfigError("'\(v)' is out of range: \(humanSeconds(range.lowerBound)) to \(humanSeconds(range.upperBound))")
        }
        return d
    }

    /// 0 (off) or a duration within `range`.
    static func duration(_ v: String, zeroOr range: ClosedRange<Double>) throws -> Double {
        let d = try duration(v)
        guard d == 0 || range.contains(d) else {
            throw ConfigError("'\(v)' is out of range: 0 (off) or \(humanSeconds(range.lowerBound)) to \(humanSeconds(range.upperBound))")
        }
        return d
    }

    static func humanBytes(_ n: UInt64) -> String {
        for (suffix, shift) in [("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)] where n >= 1 << UInt64(shift) && n % (1 << UInt64(shift)) == 0 {
            return "\(n >> UInt64(shift))\(suffix)"
        }
        return "\(n)"
    }

    static func humanSeconds(_ s: Double) -> String {
        for (suffix, unit) in [("d", 86400.0), ("h", 3600), ("m", 60)] where s >= unit && s.truncatingRemainder(dividingBy: unit) == 0 {
            return "\(Int(s / unit))\(suffix)"
        }
        return "\(s == s.rounded() ? "\(Int(s))" : "\(s)")s"
    }

    /// `50G`, `512M`, `1.5T`, `4096` (bytes); binary units as in nova.conf's sizes.
    public static func size(_ v: String) throws -> UInt64 {
        let s = v.trimmingCharacters(in: .whitespaces).uppercased()
        var number = s
        var shift: UInt64 = 0
        for (suffix, sh) in [("TIB", 40), ("GIB", 30), ("MIB", 20), ("KIB", 10), ("TB", 40), ("GB", 30), ("MB", 20), ("KB", 10),
                             ("T", 40), ("G", 30), ("M", 20), ("K", 10), ("B", 0)] where s.hasSuffix(suffix) {
            number = String(s.dropLast(suffix.count)).trimmingCharacters(in: .whitespaces)
            shift = UInt64(sh)
            break
        }
        guard let d = Double(number), d >= 0, d.isFinite, d * Double(UInt64(1) << shift) < 1.8e19 else {
            throw ConfigError("'\(v)' is not a size such as 50G, 512M or 1073741824")
        }
        return UInt64(d * Double(UInt64(1) << shift))
    }

    /// `300`, `300s`, `10m`, `2h`, `1d` → seconds.
    public static func duration(_ v: String) throws -> Double {
        let s = v.trimmingCharacters(in: .whitespaces).lowercased()
        var mult = 1.0
        var number = s
        if let last = s.last, let m = ["s": 1.0, "m": 60, "h": 3600, "d": 86400][String(last)] {
            mult = m
            number = String(s.dropLast())
        }
        guard let d = Double(number), d >= 0, d.isFinite, (d * mult).isFinite else {
            throw ConfigError("'\(v)' is not a duration such as 300, 10m or 2h")
        }
        return d * mult
    }
}
