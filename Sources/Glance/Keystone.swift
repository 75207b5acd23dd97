import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// How the agent proves who it is to Keystone v3.
public enum KeystoneCredentials: Sendable, Equatable {
    case password(username: String, password: String, userDomain: String, project: String, projectDomain: String)
    case applicationCredential(id: String, secret: String)
}

/// A project-scoped token and the service catalog that came with it.
public struct KeystoneToken: Sendable {
    public var value: String
    public var expiresAt: Date
    /// (service type, interface, region, url)
    public var endpoints: [(type: String, interface: String, region: String?, url: String)]
}

/// Keystone v3 authentication: issues a token, caches it, and renews it shortly before it expires or when a service
/// answered 401. Concurrent callers share one renewal.
public actor KeystoneAuth {
    public let authURL: String
    let credentials: KeystoneCredentials
    let http: HTTPClient
    let logger: Logger
    /// Renew this long before the expiry Keystone announced.
    let margin: TimeInterval
    private var current: KeystoneToken?
    private var renewing: Task<KeystoneToken, Error>?
    public private(set) var issued = 0

    public init(authURL: String, credentials: KeystoneCredentials, http: HTTPClient, margin: TimeInterval = 120,
                logger: Logger = Logger(label: "imgconv.keystone")) {
        var u = authURL
        while u.hasSuffix("/") { u.removeLast() }
        if !u.hasSuffix("/v3") { u += "/v3" }
        self.authURL = u
        self.credentials = credentials
        self.http = http
        self.margin = margin
        self.logger = logger
    }

    /// A valid token: the cached one unless it expires within the margin (or `after` names it as rejected).
    public func token(rejected: String? = nil) async throws -> KeystoneToken {
        if let t = current, t.value != rejected, t.expiresAt.timeIntervalSinceNow > margin { return t }
        if let r = renewing { return try await r.value }
        let task = Task { try await self.issue() }
        renewing = task
        defer { renewing = nil }
        let t = try await task.value
        current = t
        return t
    }

    /// The URL of a service in the catalog (`image`, `identity`...).
    public func endpoint(type: String, interface: String = "public", region: String? = nil) async throws -> String {
        let t = try await token()
        let matches = t.endpoints.filter { $0.type == type && $0.interface == interface && (region == nil || $0.region == region) }
        guard var url = matches.first?.url else { throw GlanceError.noEndpoint(service: type, interface: interface, region: region) }
        while url.hasSuffix("/") { url.removeLast() }
        return url
    }

    private func body() -> [String: Any] {
        switch credentials {
        case let .password(user, password, userDomain, project, projectDomain):
            return ["auth": [
                "identity": ["methods": ["password"],
                             "password": ["user": ["name": user, "domain": ["name": userDomain], "password": password]]],
                "scope": ["project": ["name": project, "domain": ["name": projectDomain]]],
            ]]
        case let .applicationCredential(id, secret):
            return ["auth": ["identity": ["methods": ["application_credential"],
                                          "application_credential": ["id": id, "secret": secret]]]]
        }
    }

    private func issue() async throws -> KeystoneToken {
        let url = authURL + "/auth/tokens"
        var req = HTTPClientRequest(url: url)
        req.method = .POST
        req.headers.add(name: "Content-Type", value: "application/json")
        req.headers.add(name: "User-Agent", value: "imgconv-agent")
        req.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body())))
        // Issuing a token is safe to repeat. Two retries, 0.2 s then 0.4 s later, cover a pooled keep-alive
        // connection the server had closed (gunicorn resets idle ones) and a 5xx from an overloaded Keystone
        // (its database busy): neither is a reason to fail a fetch. A 4xx is an answer, and final.
        let retry = RetryPolicy(attempts: 2, baseDelay: 0.2, maxDelay: 0.4)
        var answer: (HTTPClientResponse, ByteBuffer)?
        for attempt in 1...(1 + retry.attempts) {
            let last = attempt > retry.attempts
            let problem: String
            do {
                let r = try await http.execute(req, timeout: .seconds(30))
                answer = (r, try await r.body.collect(upTo: 16 << 20))
                if r.status.code < 500 || last { break }
                problem = "HTTP \(r.status.code)"
            } catch {
                if last { throw GlanceError.transport(url: url, attempts: attempt, detail: "\(error)") }
                problem = "\(error)"
            }
            logger.warning("keystone token request failed; asking again", metadata: ["reason": "\(problem)", "attempt": "\(attempt)"])
            try await Task.sleep(nanoseconds: UInt64(retry.delay(attempt) * 1e9))
        }
        guard let (response, data) = answer else {
            throw GlanceError.transport(url: url, attempts: 1 + retry.attempts, detail: "no response")
        }
        guard response.status == .created || response.status == .ok else {
            throw GlanceError.authentication(status: Int(response.status.code),
                                             detail: String(buffer: data).prefix(300).description)
        }
        guard let value = response.headers.first(name: "X-Subject-Token"),
              let o = try? JSONSerialization.jsonObject(with: Data(data.readableBytesView)) as? [String: Any],
              let tok = o["token"] as? [String: Any] else {
            throw GlanceError.malformedResponse(url: url, detail: "no X-Subject-Token or token body")
        }
        let expires = (tok["expires_at"] as? String).flatMap(Self.parseDate) ?? Date().addingTimeInterval(3600)
        var endpoints: [(String, String, String?, String)] = []
        for s in (tok["catalog"] as? [[String: Any]]) ?? [] {
            guard let type = s["type"] as? String else { continue }
            for e in (s["endpoints"] as? [[String: Any]]) ?? [] {
                guard let i = e["interface"] as? String, let u = e["url"] as? String else { continue }
                endpoints.append((type, i, (e["region_id"] as? String) ?? (e["region"] as? String), u))
            }
        }
        issued += 1
        logger.info("keystone token issued", metadata: ["expires": "\(expires)", "endpoints": "\(endpoints.count)"])
        return KeystoneToken(value: value, expiresAt: expires, endpoints: endpoints.map { ($0.0, $0.1, $0.2, $0.3) })
    }

    /// Keystone writes `2026-11-22T06:48:00.000000Z`.
    static func parseDate(_ s: String) -> Date? {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let d = f.date(from: s) { return d }
        f.formatOptions = [.withInternetDateTime]
        if let d = f.date(from: s) { return d }
        // microseconds: trim to milliseconds
        if let dot = s.firstIndex(of: "."), let z = s.lastIndex(of: "Z"), s.distance(from: dot, to: z) > 4 {
            let trimmed = String(s[..<s.index(dot, offsetBy: 4)]) + "Z"
            f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            return f.date(from: trimmed)
        }
        return nil
    }
}

extension Optional where Wrapped == KeystoneAuth {
    /// Sends `request` with a token from this auth (as is without one), renewing the token and sending again once
    /// when the service answers 401 (a token revoked or expired early). Transport errors are thrown as they come;
    /// a failed token request throws its `GlanceError`.
    func send(_ request: HTTPClientRequest, http: HTTPClient, timeout: TimeAmount, logger: Logger) async throws -> HTTPClientResponse {
        var req = request
        req.headers.replaceOrAdd(name: "User-Agent", value: "imgconv-agent")
        guard let auth = self else { return try await http.execute(req, timeout: timeout) }
        var token = try await auth.token().value
        req.headers.replaceOrAdd(name: "X-Auth-Token", value: token)
        let response = try await http.execute(req, timeout: timeout)
        guard response.status == .unauthorized else { return response }
        _ = try? await response.body.collect(upTo: 1 << 20)
        logger.info("401 from the service; renewing the Keystone token", metadata: ["url": "\(request.url)"])
        token = try await auth.token(rejected: token).value
        req.headers.replaceOrAdd(name: "X-Auth-Token", value: token)
        return try await http.execute(req, timeout: timeout)
    }
}
