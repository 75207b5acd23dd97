import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// A Cinder volume as the block-storage API v3 shows it: what the agent needs to find the volume's RBD image.
public struct CinderVolume: Sendable, Equatable {
    public var id: String
    public var name: String?
    public var status: String
    /// `os-vol-host-attr:host`, `host@backend#pool` (shown to admins only; nil otherwise).
    public var host: String?
    public var volumeType: String?
    public var metadata: [String: String]

    public init(json d: [String: Any]) throws {
        guard let id = d["id"] as? String, let status = d["status"] as? String else {
            throw GlanceError.malformedResponse(url: "volume", detail: "no id or status")
        }
        self.id = id
        self.status = status
        name = d["name"] as? String
        host = d["os-vol-host-attr:host"] as? String
        volumeType = d["volume_type"] as? String
        metadata = (d["metadata"] as? [String: Any] ?? [:]).compactMapValues { $0 as? String }
    }

    /// `backend` of `host@backend#pool`.
    public var backend: String? {
        guard let host, let at = host.firstIndex(of: "@") else { return nil }
        return String(host[host.index(after: at)...].prefix { $0 != "#" })
    }
}

/// A back-end pool as the scheduler reports it (`GET /v3/{project}/scheduler-stats/get_pools?detail=true`). The RBD
/// driver's `location_info` is `<cluster>:<ceph.conf>:<fsid>:<user>:<pool>`.
public struct CinderPool: Sendable, Equatable {
    public var name: String
    public var volumeBackendName: String?
    public var storageProtocol: String?
    public var locationInfo: String?

    /// (fsid, RBD pool) of an RBD back end; nil for another driver or a malformed value. The path to ceph.conf may
    /// hold colons, so the fields are taken from the end.
    public var rbd: (fsid: String, pool: String)? {
        guard storageProtocol?.lowercased() == "ceph" || storageProtocol?.lowercased() == "rbd",
              let parts = locationInfo?.split(separator: ":", omittingEmptySubsequences: false), parts.count >= 5 else { return nil }
        let fsid = String(parts[parts.count - 3]), pool = String(parts[parts.count - 1])
        guard !fsid.isEmpty, !pool.isEmpty else { return nil }
        return (fsid, pool)
    }
}

/// Cinder's block-storage API v3 with the agent's Keystone credentials: the two reads the `cinder-clone` path needs.
/// The endpoint is `volumev3` (or `block-storage`) from the catalog, or `endpointOverride`. Requests are bounded by
/// `timeout`: an unreachable Cinder means falling back to Glance, so it must not hold a boot up.
public final class CinderClient: Sendable {
    let http: HTTPClient
    let auth: KeystoneAuth?
    let interface: String
    let region: String?
    let endpointOverride: String?
    let timeout: TimeAmount
    let logger: Logger

    public init(http: HTTPClient, auth: KeystoneAuth?, interface: String = "public", region: String? = nil,
                endpointOverride: String? = nil, timeout: TimeAmount = .seconds(15), logger: Logger = Logger(label: "imgconv.cinder")) {
        self.http = http
        self.auth = auth
        self.interface = interface
        self.region = region
        self.endpointOverride = endpointOverride.map { s in var u = s; while u.hasSuffix("/") { u.removeLast() }; return u }
        self.timeout = timeout
        self.logger = logger
    }

    /// `http://host:8776/v3/<project_id>`.
    public func baseURL() async throws -> String {
        if let endpointOverride { return endpointOverride }
        guard let auth else { throw GlanceError.noEndpoint(service: "volumev3", interface: interface, region: region) }
        do {
            return try await auth.endpoint(type: "volumev3", interface: interface, region: region)
        } catch GlanceError.noEndpoint {
            return try await auth.endpoint(type: "block-storage", interface: interface, region: region)
        }
    }

    func get(_ path: String) async throws -> [String: Any] {
        let url = try await baseURL() + path
        var req = HTTPClientRequest(url: url)
        req.headers.add(name: "Accept", value: "application/json")
        let response: HTTPClientResponse
        do {
            response = try await auth.send(req, http: http, timeout: timeout, logger: logger)
        } catch let e as GlanceError {
            throw e
        } catch {
            throw GlanceError.transport(url: url, attempts: 1, detail: "\(error)")
        }
        let body = try await response.body.collect(upTo: 16 << 20)
        guard response.status == .ok else {
            throw GlanceError.http(method: "GET", url: url, status: Int(response.status.code), detail: GlanceClient.excerpt(body))
        }
        guard let o = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: Any] else {
            throw GlanceError.malformedResponse(url: url, detail: "not a JSON object")
        }
        return o
    }

    /// `GET /volumes/{id}`.
    public func volume(_ id: String) async throws -> CinderVolume {
        guard ImageID.isValid(id) else { throw GlanceError.malformedResponse(url: "volume", detail: "'\(id)' is not a volume id") }
        let o = try await get("/volumes/\(id.lowercased())")
        guard let v = o["volume"] as? [String: Any] else { throw GlanceError.malformedResponse(url: "volume \(id)", detail: "no volume") }
        return try CinderVolume(json: v)
    }

    /// `GET /scheduler-stats/get_pools?detail=true` (admin only by Cinder's default policy).
    public func pools() async throws -> [CinderPool] {
        let o = try await get("/scheduler-stats/get_pools?detail=true")
        return ((o["pools"] as? [[String: Any]]) ?? []).compactMap { p in
            guard let name = p["name"] as? String else { return nil }
            let c = p["capabilities"] as? [String: Any] ?? [:]
            return CinderPool(name: name, volumeBackendName: c["volume_backend_name"] as? String,
                              storageProtocol: c["storage_protocol"] as? String, locationInfo: c["location_info"] as? String)
        }
    }
}
