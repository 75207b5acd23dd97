import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// Where the Glance API is and how requests are authenticated.
public struct GlanceEndpoint: Sendable {
    /// `[glance] api_servers`: tried in order. Empty: the `image` endpoint from the Keystone catalog.
    public var apiServers: [String]
    public var auth: KeystoneAuth?
    public var region: String?
    public var interface: String

    public init(apiServers: [String] = [], auth: KeystoneAuth?, region: String? = nil, interface: String = "public") {
        self.apiServers = apiServers.map { s in var u = s; while u.hasSuffix("/") { u.removeLast() }; return u }
        self.auth = auth
        self.region = region
        self.interface = interface
    }
}

/// A Glance v2 client: show, list with pagination and filters, and the raw download request (see
/// `VerifiedDownload` for the resumable, verified stream). A 401 renews the Keystone token once and retries.
public final class GlanceClient: Sendable {
    public let http: HTTPClient
    public let endpoint: GlanceEndpoint
    let logger: Logger

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
    public func send(_ method: HTTPMethod, _ pathAndQuery: String, headers: [(String, String)] = [],
                     timeout: TimeAmount = .seconds(60)) async throws -> (HTTPClientResponse, String) {
        var lastError: Error?
        for base in try await baseURLs() {
            let url = base + pathAndQuery
            var rejected: String?
            // A GET is retried once on a transport error: a pooled keep-alive connection the server has just
            // closed fails the first use (ECONNRESET) with nothing sent.
            var transportRetries = method == .GET ? 1 : 0
            for _ in 0..<3 {
                var req = HTTPClientRequest(url: url)
                req.method = method
                req.headers.add(name: "User-Agent", value: "imgconv-agent")
                for (k, v) in headers { req.headers.add(name: k, value: v) }
                var token: String?
                if let auth = endpoint.auth {
                    token = try await auth.token(rejected: rejected).value
                    req.headers.add(name: "X-Auth-Token", value: token!)
                }
                let response: HTTPClientResponse
                do {
                    response = try await http.execute(req, timeout: timeout)
                } catch {
                    lastError = GlanceError.transport(url: url, attempts: 1, detail: "\(error)")
                    if transportRetries > 0 {
                        transportRetries -= 1
                        logger.info("glance request failed; retrying once", metadata: ["url": "\(url)", "error": "\(error)"])
                        continue
                    }
                    break
                }
                if response.status == .unauthorized, endpoint.auth != nil, rejected == nil {
                    _ = try? await response.body.collect(upTo: 1 << 20)
                    logger.info("glance answered 401; renewing the token", metadata: ["url": "\(url)"])
                    rejected = token
                    continue
                }
                return (response, url)
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

    static func escape(_ s: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~:,")
        return s.addingPercentEncoding(withAllowedCharacters: allowed) ?? s
    }

    /// `GET /v2/images/{id}/file`, from `offset` on when it is not zero. The caller reads the body.
    public func openFile(_ id: String, offset: UInt64) async throws -> (HTTPClientResponse, String) {
        guard ImageID.isValid(id) else { throw GlanceError.imageNotFound(id) }
        var headers: [(String, String)] = []
        if offset > 0 { headers.append(("Range", "bytes=\(offset)-")) }
        return try await send(.GET, "/v2/images/\(id)/file", headers: headers, timeout: .seconds(60))
    }
}
