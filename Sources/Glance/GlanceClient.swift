import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// Where the Glance API is and how requests are authenticated.
public struct GlanceEndpoint: Sendable {
    /// `[glance] api_servers`: tried in order. Empty: the `image` endpoint from the Keystone catalog.
    public var apiServers: [String]
    public var auth: KeystoneAuth?
    public var region: String?
    public var interface: String
    /// `[glance] prefer_stores`: the stores Glance should read an image from first (`?prefer=` on downloads, on a
    /// Glance that supports it).
    public var preferStores: [String]

    public init(apiServers: [String] = [], auth: KeystoneAuth?, region: String? = nil, interface: String = "public",
                preferStores: [String] = []) {
        self.apiServers = apiServers.map { s in var u = s; while u.hasSuffix("/") { u.removeLast() }; return u }
        self.auth = auth
        self.region = region
        self.interface = interface
        self.preferStores = preferStores
    }
}

/// A Glance v2 client: show, list with pagination and filters, and the raw download request (see
/// `VerifiedDownload` for the resumable, verified stream). A 401 renews the Keystone token once and retries.
public final class GlanceClient: Sendable {
    public let http: HTTPClient
    public let endpoint: GlanceEndpoint
    let logger: Logger
    /// Whether this Glance takes `?prefer=`: nil until the first download asks (see `preferQuery`).
    let preferSupported = Mutex<Bool?>(nil)

    public init(http: HTTPClient, endpoint: GlanceEndpoint, logger: Logger = Logger(label: "imgconv.glance")) {
        self.http = http
        self.endpoint = endpoint
        self.logger = logger
    }

    /// The API root (no `/v2`).
    public func baseURLs() async throws -> [String] {
        if !endpoint.apiServers.isEmpty { return endpoint.apiServers }
        guard let auth = endpoint.auth else {
            throw GlanceError.noEndpoint(service: "image", interface: endpoint.interface, region: endpoint.region)
        }
        var u = try await auth.endpoint(type: "image", interface: endpoint.interface, region: endpoint.region)
        if u.hasSuffix("/v2") { u.removeLast(3) }
        return [u]
    }

    /// Sends a request to the first API server that answers, with the token; renews the token once on a 401.
    public func send(_ method: HTTPMethod, _ pathAndQuery: String, headers: [(String, String)] = [], json: Any? = nil,
                     timeout: TimeAmount = .seconds(60)) async throws -> (HTTPClientResponse, String) {
        let body = try json.map { try JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]) }
        var lastError: Error?
        for base in try await baseURLs() {
            let url = base + pathAndQuery
            var req = HTTPClientRequest(url: url)
            req.method = method
            for (k, v) in headers { req.headers.add(name: k, value: v) }
            if let body {
                req.headers.add(name: "Content-Type", value: "application/json")
                req.body = .bytes(ByteBuffer(bytes: body))
            }
            // A GET is retried once on a transport error: a pooled keep-alive connection the server has just
            // closed fails the first use (ECONNRESET) with nothing sent.
            for attempt in 0...(method == .GET ? 1 : 0) {
                do {
                    return (try await endpoint.auth.send(req, http: http, timeout: timeout, logger: logger), url)
                } catch let e as GlanceError {
                    throw e
                } catch {
                    lastError = GlanceError.transport(url: url, attempts: 1, detail: "\(error)")
                    if attempt == 0 && method == .GET {
                        logger.info("glance request failed; retrying once", metadata: ["url": "\(url)", "error": "\(error)"])
                    }
                }
            }
        }
        throw lastError ?? GlanceError.transport(url: pathAndQuery, attempts: 1, detail: "no API server answered")
    }

    func json(_ pathAndQuery: String) async throws -> (Any, String) {
        let (r, url) = try await send(.GET, pathAndQuery, headers: [("Accept", "application/json")])
        let body = try await r.body.collect(upTo: 64 << 20)
        if r.status == .notFound { throw GlanceError.http(method: "GET", url: url, status: 404, detail: Self.excerpt(body)) }
        guard r.status == .ok else {
            throw GlanceError.http(method: "GET", url: url, status: Int(r.status.code), detail: Self.excerpt(body))
        }
        guard let o = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) else {
            throw GlanceError.malformedResponse(url: url, detail: "not JSON")
        }
        return (o, url)
    }

    static func excerpt(_ b: ByteBuffer) -> String {
        String(String(buffer: b).prefix(300)).replacingOccurrences(of: "\n", with: " ")
    }

    /// `GET /v2/images/{id}`.
    public func show(_ id: String) async throws -> GlanceImage {
        guard ImageID.isValid(id) else { throw GlanceError.imageNotFound(id) }
        do {
            let (o, url) = try await json("/v2/images/\(id)")
            guard let d = o as? [String: Any] else { throw GlanceError.malformedResponse(url: url, detail: "not an object") }
            return try GlanceImage(json: d)
        } catch let GlanceError.http(_, _, status, _) where status == 404 {
            throw GlanceError.imageNotFound(id)
        }
    }

    /// `GET /v2/images` with filters (`tag`, `status`, a property...), following `next` until the last page.
    public func list(filters: [(String, String)] = [], pageSize: Int = 100, maxPages: Int = 1000) async throws -> [GlanceImage] {
        var query = filters.map { "\(Self.escape($0.0))=\(Self.escape($0.1))" }
        query.append("limit=\(pageSize)")
        var next: String? = "/v2/images?" + query.joined(separator: "&")
        var out: [GlanceImage] = []
        var pages = 0
        while let path = next, pages < maxPages {
            pages += 1
            let (o, url) = try await json(path)
            guard let d = o as? [String: Any], let images = d["images"] as? [[String: Any]] else {
                throw GlanceError.malformedResponse(url: url, detail: "no images array")
            }
            out += try images.map(GlanceImage.init(json:))
            // `next` is a path relative to the API root (it starts with /v2/).
            if let n = d["next"] as? String, !images.isEmpty, n.hasPrefix("/v2/") { next = n } else { next = nil }
        }
        return out
    }

    /// What Glance answered to a copy-image import.
    public enum CopyAnswer: Sendable, Equatable {
        /// 202: the copy runs as a Glance task; poll the image.
        case accepted
        /// 400 "already present": the image is in the store.
        case alreadyPresent
        /// 409: another import of the image runs (Glance's `os_glance_import_task` lock): poll the image.
        case busy(String)
        /// 403: the policy (`copy_image`, admin-only by default) refuses this user.
        case forbidden(String)
        /// Anything else: the copy will not happen.
        case refused(status: Int, detail: String)
    }

    /// `POST /v2/images/{id}/import` with the copy-image method: asks Glance to copy an active image into `stores`.
    public func copyImage(_ id: String, to stores: [String]) async throws -> CopyAnswer {
        guard ImageID.isValid(id) else { throw GlanceError.imageNotFound(id) }
        let (r, _) = try await send(.POST, "/v2/images/\(id)/import", json: [
            "method": ["name": "copy-image"], "stores": stores, "all_stores_must_succeed": false,
        ] as [String: Any])
        let detail = (try? await r.body.collect(upTo: 1 << 20)).map(Self.excerpt) ?? ""
        switch r.status.code {
        case 200...299: return .accepted
        case 400 where detail.contains("already present"): return .alreadyPresent
        case 403: return .forbidden(detail)
        case 404: throw GlanceError.imageNotFound(id)
        case 409: return .busy(detail)
        default: return .refused(status: Int(r.status.code), detail: detail)
        }
    }

    /// `GET /v2/images/{id}/locations` (Glance 29+; the service role by default): each location's URL and store.
    /// Nil when this user may not read them (403) or this Glance has no such call (404 on the path).
    public func locations(_ id: String) async throws -> [(url: String, store: String?)]? {
        guard ImageID.isValid(id) else { throw GlanceError.imageNotFound(id) }
        let (r, url) = try await send(.GET, "/v2/images/\(id)/locations", headers: [("Accept", "application/json")])
        let body = try await r.body.collect(upTo: 16 << 20)
        guard r.status == .ok else { return nil }
        guard let list = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [[String: Any]] else {
            throw GlanceError.malformedResponse(url: url, detail: "not a list of locations")
        }
        return list.compactMap { l in
            (l["url"] as? String).map { ($0, (l["metadata"] as? [String: Any])?["store"] as? String) }
        }
    }

    static func escape(_ s: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~:,")
        return s.addingPercentEncoding(withAllowedCharacters: allowed) ?? s
    }

    /// `GET /v2/images/{id}/file`, from `offset` on when it is not zero, with `?prefer=` when configured and
    /// supported. The caller reads the body.
    public func openFile(_ id: String, offset: UInt64) async throws -> (HTTPClientResponse, String) {
        guard ImageID.isValid(id) else { throw GlanceError.imageNotFound(id) }
        var headers: [(String, String)] = []
        if offset > 0 { headers.append(("Range", "bytes=\(offset)-")) }
        let query = try await preferQuery(probing: id)
        return try await send(.GET, "/v2/images/\(id)/file" + query, headers: headers, timeout: .seconds(60))
    }

    /// `?prefer=a,b` when `[glance] prefer_stores` is set and this Glance understands it, else "". Store
    /// preference is new in Glance 33 and did not change the API version, so the first download asks once: the
    /// same request with a store that cannot exist and a Range past any image's end. A Glance that reads `prefer`
    /// refuses the store (400 "Store ... is not configured") before it looks at the Range; one that does not
    /// ignores the parameter and refuses the Range (416). No image data is sent either way. A Glance without
    /// multiple stores (400 "...not available..."), or a policy that forbids store selection (403), also means
    /// no `prefer`.
    func preferQuery(probing id: String) async throws -> String {
        let stores = endpoint.preferStores
        guard !stores.isEmpty else { return "" }
        let known = preferSupported.withLock { $0 }
        let supported: Bool
        if let known {
            supported = known
        } else {
            let (r, url) = try await send(.GET, "/v2/images/\(id)/file?prefer=imgconv-probe.invalid",
                                          headers: [("Range", "bytes=4611686018427387904-")], timeout: .seconds(30))
            let body = (try? await r.body.collect(upTo: 1 << 20)).map(Self.excerpt) ?? ""
            switch r.status.code {
            case 400 where body.contains("is not configured") || body.contains("does not exist"): supported = true
            case 404: return ""  // the image is gone: the download itself will say so
            default: supported = false
            }
            preferSupported.withLock { $0 = supported }
            if supported {
                logger.info("glance takes store preferences; downloads ask for them", metadata: ["prefer": "\(stores.joined(separator: ","))"])
            } else {
                logger.warning("glance does not take store preferences (?prefer=, Glance 33+ with several stores); [glance] prefer_stores is not used",
                               metadata: ["url": "\(url)", "status": "\(r.status.code)", "detail": "\(body)"])
            }
        }
        return supported ? "?prefer=" + stores.map(Self.escape).joined(separator: ",") : ""
    }
}
