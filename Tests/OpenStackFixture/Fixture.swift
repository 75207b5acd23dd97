import AsyncHTTPClient
import Foundation
import NIOCore

/// The real Keystone + Glance that `scripts/openstack-fixture.sh start` runs, as tests see it. CI starts it and
/// sets IMGCONV_REQUIRE_OPENSTACK=1, so a missing fixture fails there instead of skipping the end-to-end tests.
public enum OpenStack {
    public static let repository: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    public static let env: [String: String] = {
        let dir = ProcessInfo.processInfo.environment["IMGCONV_FIXTURE_DIR"] ?? "/tmp/imgconv-openstack"
        var out: [String: String] = [:]
        if let text = try? String(contentsOfFile: dir + "/env", encoding: .utf8) {
            for line in text.split(separator: "\n") {
                guard let eq = line.firstIndex(of: "=") else { continue }
                out[String(line[..<eq])] = String(line[line.index(after: eq)...])
            }
        }
        let healthy = out["GLANCE_URL"].map { answers($0 + "/healthcheck") } ?? false
        if !healthy {
            if ProcessInfo.processInfo.environment["IMGCONV_REQUIRE_OPENSTACK"] == "1" {
                fatalError("IMGCONV_REQUIRE_OPENSTACK=1 but Glance is not answering: run scripts/openstack-fixture.sh start")
            }
            return [:]
        }
        return out
    }()

    /// True when a GET of `url` answers 2xx (curl, so no HTTP stack is needed this early).
    public static func answers(_ url: String) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["curl", "-sf", "-m", "5", "-o", "/dev/null", url]
        guard (try? p.run()) != nil else { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    public static var available: Bool { env["GLANCE_URL"] != nil }
    public static var glanceURL: String { env["GLANCE_URL"]! }
    public static var keystoneURL: String { env["KEYSTONE_URL"]! }
    public static var storeDir: String { env["GLANCE_STORE_DIR"]! }
    public static var accessLog: String { env["GLANCE_ACCESS_LOG"]! }
    /// Glance's Ceph store (the fixture started with IMGCONV_CEPH_ENV), if it has one.
    public static var rbdStore: String? { env["GLANCE_RBD_STORE"] }
    /// Glance's s3 store on the cluster's RADOS Gateway, and its read-only http store, if it has them.
    public static var s3Store: String? { env["GLANCE_S3_STORE"] }
    public static var webStore: String? { env["GLANCE_WEB_STORE"] }
    /// The same Glance behind a second API that hides locations (show_image_direct_url and
    /// show_multiple_locations off), and the user Glance itself runs as (admin and service roles), if there is one.
    public static var privateGlanceURL: String? { env["GLANCE_PRIVATE_URL"] }
    public static var serviceUser: (name: String, password: String, project: String)? {
        guard let u = env["GLANCE_SERVICE_USERNAME"], let p = env["GLANCE_SERVICE_PASSWORD"],
              let pr = env["GLANCE_SERVICE_PROJECT_NAME"] else { return nil }
        return (u, p, pr)
    }
    /// Every store of this Glance: file1, and with Ceph ceph1, s3rgw and web.
    public static var stores: [String] { ["file1"] + [rbdStore, s3Store, webStore].compactMap { $0 } }

    /// Admin tokens are shared by every test of a process (renewed after 30 minutes): issuing one per request
    /// made Keystone's sqlite the bottleneck when two suites ran at once.
    static let tokenCache = TokenCache()

    final class TokenCache: @unchecked Sendable {
        private let lock = NSLock()
        private var value: (String, Date)?
        func get() -> String? {
            lock.lock(); defer { lock.unlock() }
            guard let (t, at) = value, Date().timeIntervalSince(at) < 1800 else { return nil }
            return t
        }
        func set(_ t: String) { lock.lock(); value = (t, Date()); lock.unlock() }
    }

    static func adminToken() async throws -> String {
        if let t = tokenCache.get() { return t }
        let t = try await token()
        tokenCache.set(t)
        return t
    }

    /// Retries a fixture call that met a 5xx (sqlite contention in the test servers, not the code under test).
    /// Connection resets (gunicorn closing a pooled keep-alive connection) are retried too.
    static func retrying<T>(_ what: String, _ body: () async throws -> (Int, T)) async throws -> (Int, T) {
        var last: (Int, T)?
        var lastError: Error?
        for attempt in 0..<4 {
            do {
                let r = try await body()
                if r.0 < 500 { return r }
                last = r
            } catch {
                lastError = error
            }
            try await Task.sleep(nanoseconds: UInt64(250_000_000 << attempt))
        }
        if let last { return last }
        throw lastError!
    }

    /// A project-scoped token for a user of the fixture.
    public static func token(user: String = "admin", password: String = "secret", project: String = "admin") async throws -> String {
        let body = """
        {"auth":{"identity":{"methods":["password"],"password":{"user":{"name":"\(user)","domain":{"id":"default"},"password":"\(password)"}}},\
        "scope":{"project":{"name":"\(project)","domain":{"id":"default"}}}}}
        """
        var req = HTTPClientRequest(url: keystoneURL + "/auth/tokens")
        req.method = .POST
        req.headers.add(name: "Content-Type", value: "application/json")
        req.body = .bytes(ByteBuffer(string: body))
        let (status, t): (Int, String?) = try await retrying("token") {
            let r = try await HTTPClient.shared.execute(req, timeout: .seconds(60))
            _ = try await r.body.collect(upTo: 16 << 20)
            return (Int(r.status.code), r.headers.first(name: "X-Subject-Token"))
        }
        guard let t else { throw FixtureError("no token for \(user): HTTP \(status)") }
        return t
    }

    public struct FixtureError: Error, CustomStringConvertible {
        public var description: String
        public init(_ d: String) { description = d }
    }

    /// Sends a request to Glance as admin; returns the status and the JSON body (if any).
    @discardableResult
    public static func glance(_ method: String, _ path: String, json: Any? = nil, body: [UInt8]? = nil,
                              contentType: String? = nil, store: String? = nil) async throws -> (Int, Any?) {
        // An upload is not repeatable (a second PUT of the data is a 409): only the other calls are retried.
        if method == "PUT" && path.hasSuffix("/file") {
            return try await glanceOnce(method, path, json: json, body: body, contentType: contentType, store: store)
        }
        return try await retrying("\(method) \(path)") {
            try await glanceOnce(method, path, json: json, body: body, contentType: contentType)
        }
    }

    /// Glance's sqlite answers "database is locked" (500) when two writes overlap, and a busy timeout does not
    /// help a transaction that must upgrade to a write. The tests' writes (create, upload, delete) go one at a
    /// time; the agent under test only reads from Glance.
    static let writes = SerialQueue()

    public actor SerialQueue {
        private var tail: Task<Void, Never>?
        public func run<T: Sendable>(_ op: @escaping @Sendable () async throws -> T) async throws -> T {
            let previous = tail
            let task = Task { () async throws -> T in
                _ = await previous?.value
                return try await op()
            }
            tail = Task { _ = try? await task.value }
            return try await task.value
        }
    }

    /// `GET path` on a Glance API at `base` with a token: the status and the JSON body.
    public static func get(_ base: String, _ path: String, token: String) async throws -> (Int, Any?) {
        var req = HTTPClientRequest(url: base + path)
        req.headers.add(name: "X-Auth-Token", value: token)
        let r = try await HTTPClient.shared.execute(req, timeout: .seconds(60))
        let data = try await r.body.collect(upTo: 16 << 20)
        return (Int(r.status.code), try? JSONSerialization.jsonObject(with: Data(data.readableBytesView)))
    }

    static func glanceOnce(_ method: String, _ path: String, json: Any?, body: [UInt8]?,
                           contentType: String?, store: String? = nil) async throws -> (Int, Any?) {
        let jsonBytes = try json.map { [UInt8](try JSONSerialization.data(withJSONObject: $0)) }
        let (status, data) = method == "GET"
            ? try await glanceSend(method, path, json: jsonBytes, body: body, contentType: contentType)
            : try await writes.run { try await glanceSend(method, path, json: jsonBytes, body: body, contentType: contentType, store: store) }
        let o = data.isEmpty ? nil : try? JSONSerialization.jsonObject(with: Data(data))
        return (status, o)
    }

    static func glanceSend(_ method: String, _ path: String, json: [UInt8]?, body: [UInt8]?,
                           contentType: String?, store: String? = nil) async throws -> (Int, [UInt8]) {
        var req = HTTPClientRequest(url: glanceURL + path)
        req.method = .init(rawValue: method)
        req.headers.add(name: "X-Auth-Token", value: try await adminToken())
        if let store { req.headers.add(name: "X-Image-Meta-Store", value: store) }
        if let json {
            req.headers.add(name: "Content-Type", value: contentType ?? "application/json")
            req.body = .bytes(ByteBuffer(bytes: json))
        } else if let body {
            req.headers.add(name: "Content-Type", value: "application/octet-stream")
            req.body = .bytes(ByteBuffer(bytes: body))
        }
        let r = try await HTTPClient.shared.execute(req, timeout: .seconds(300))
        let data = try await r.body.collect(upTo: 64 << 20)
        return (Int(r.status.code), Array(data.readableBytesView))
    }

    /// Creates an image with extra properties and tags, uploads the bytes, and returns its record.
    /// `store`: a Glance store id (`rbdStore` for the Ceph one).
    public static func createImage(_ bytes: [UInt8], diskFormat: String = "raw", name: String = "imgconv-test",
                                   properties: [String: String] = [:], tags: [String] = [],
                                   store: String? = nil) async throws -> [String: Any] {
        var meta: [String: Any] = ["name": name, "disk_format": diskFormat, "container_format": "bare", "tags": tags]
        for (k, v) in properties { meta[k] = v }
        let (status, o) = try await glance("POST", "/v2/images", json: meta)
        guard status == 201, let created = o as? [String: Any], let id = created["id"] as? String else {
            throw FixtureError("create image: HTTP \(status) \(String(describing: o))")
        }
        let (up, err) = try await upload(id, bytes, store: store)
        guard up == 204 else { throw FixtureError("upload: HTTP \(up) \(String(describing: err))") }
        let (_, shown) = try await glance("GET", "/v2/images/\(id)")
        return shown as! [String: Any]
    }

    /// An image in `store`: uploaded with X-Image-Meta-Store, or for the read-only http store, written to the
    /// fixture's web server and registered by URL through the location API (Glance HEADs and GETs it and computes
    /// the hashes), as an operator registers an image that lives on a web server.
    public static func createImage(_ bytes: [UInt8], diskFormat: String, name: String, inStore store: String) async throws -> [String: Any] {
        guard store == webStore, let dir = env["GLANCE_WEB_DIR"], let base = env["GLANCE_WEB_URL"] else {
            return try await createImage(bytes, diskFormat: diskFormat, name: name, store: store)
        }
        // Glance's location import runs as a task that writes to its sqlite; when another write holds the
        // database it fails ("database is locked") and leaves the image queued: register it again.
        var failures: [String] = []
        for _ in 0..<4 {
            let (status, o) = try await glance("POST", "/v2/images", json: ["name": name, "disk_format": diskFormat, "container_format": "bare"])
            guard status == 201, let id = (o as? [String: Any])?["id"] as? String else {
                throw FixtureError("create image: HTTP \(status) \(String(describing: o))")
            }
            try Data(bytes).write(to: URL(fileURLWithPath: "\(dir)/\(id).img"))
            let sha512 = try shellOutput(["sha512sum", "\(dir)/\(id).img"]).prefix(128)
            let (added, err) = try await glance("POST", "/v2/images/\(id)/locations", json: [
                "url": "\(base)/\(id).img", "validation_data": ["os_hash_algo": "sha512", "os_hash_value": String(sha512)],
            ])
            guard added == 202 else { throw FixtureError("add location: HTTP \(added) \(String(describing: err))") }
            for _ in 0..<200 {
                let (_, shown) = try await glance("GET", "/v2/images/\(id)")
                if let image = shown as? [String: Any], image["status"] as? String == "active" { return image }
                try await Task.sleep(for: .milliseconds(100))
            }
            failures.append(id)
            await deleteImage(id)
        }
        throw FixtureError("images registered at \(base) never became active: \(failures)")
    }

    static func shellOutput(_ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: out, as: UTF8.self)
    }

    /// Uploads one of `samples/` (for example `qcow2-zlib.qcow2`) and returns the new image's id.
    public static func createSampleImage(_ sample: String, diskFormat: String, name: String) async throws -> String {
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: repository + "/samples/" + sample)))
        return try await createImage(bytes, diskFormat: diskFormat, name: name)["id"] as! String
    }

    /// The data PUT is not repeatable once Glance took it, but a PUT sent on a pooled connection gunicorn had
    /// already closed ("I/O on closed channel") never reached it: the image is still `queued`, and sending
    /// again is safe.
    static func upload(_ id: String, _ bytes: [UInt8], store: String?) async throws -> (Int, Any?) {
        for attempt in 0..<3 {
            do {
                return try await glance("PUT", "/v2/images/\(id)/file", body: bytes, store: store)
            } catch {
                let (_, shown) = try await glance("GET", "/v2/images/\(id)")
                guard attempt < 2, (shown as? [String: Any])?["status"] as? String == "queued" else { throw error }
            }
        }
        throw FixtureError("upload of \(id): unreachable")
    }

    /// Glance's cinder stores (cinder-fast, cinder-slow) when the fixture runs Cinder.
    public static var cinderStores: [String] { env["GLANCE_CINDER_STORES"]?.split(separator: ",").map(String.init) ?? [] }

    /// The RBD pool of each cinder store's back end, as the fixture sets them up.
    public static var cinderPools: [String: String] {
        ["cinder-fast": env["CINDER_POOL_FAST"] ?? "volumes-fast", "cinder-slow": env["CINDER_POOL_SLOW"] ?? "volumes-slow"]
    }

    /// `GET <cinder>/<admin project>/<path>` as admin: the status and the JSON body.
    public static func cinder(_ path: String) async throws -> (Int, Any?) {
        guard let base = env["CINDER_URL"] else { throw FixtureError("the fixture runs no Cinder") }
        let token = try await adminToken()
        let (_, projects) = try await get(keystoneURL, "/projects?name=admin", token: token)
        guard let project = ((projects as? [String: Any])?["projects"] as? [[String: Any]])?.first?["id"] as? String else {
            throw FixtureError("no admin project in Keystone")
        }
        return try await get(base + "/" + project, path, token: token)
    }

    /// The Cinder volume behind an image's `cinder://<store>/<volume>` location.
    public static func cinderVolume(ofImage image: [String: Any]) -> String? {
        ((image["locations"] as? [[String: Any]]) ?? []).compactMap { $0["url"] as? String }
            .first { $0.hasPrefix("cinder://") }.map { String($0.split(separator: "/").last!) }
    }

    public static func deleteImage(_ id: String) async {
        _ = try? await glance("DELETE", "/v2/images/\(id)")
    }

    /// Lines of Glance's access log that fetched this image's data.
    public static func fileRequests(_ id: String) -> Int {
        let log = (try? String(contentsOfFile: accessLog, encoding: .utf8)) ?? ""
        return log.split(separator: "\n").filter { $0.contains("/v2/images/\(id)/file") && $0.contains("\"GET ") }.count
    }

    /// Mixed content: text, pseudo-random bytes and zero runs.
    public static func testBytes(_ count: Int, seed: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var x = seed | 1
        var i = 0
        while i < count {
            let run = min(count - i, 65536)
            switch (i / 65536) % 3 {
            case 0:
                for j in 0..<run { x ^= x << 13; x ^= x >> 7; x ^= x << 17; out[i + j] = UInt8(truncatingIfNeeded: x) }
            case 1:
                let text = Array("imgconv agent test \(seed)\n".utf8)
                for j in 0..<run { out[i + j] = text[j % text.count] }
            default: break
            }
            i += run
        }
        return out
    }
}

/// scripts/test-proxy.py in front of Glance: counts requests, cuts connections, ignores Range, throttles.
public final class TestProxy: @unchecked Sendable {
    public let port: Int
    public let log: String
    public let control: String
    let process: Process

    /// In front of Glance, or of whatever `upstream` (a base URL) names.
    public init(settings: [String: Any] = [:], upstream: String = OpenStack.glanceURL) throws {
        let dir = NSTemporaryDirectory() + "imgconv-proxy-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        log = dir + "/requests.log"
        control = dir + "/control.json"
        FileManager.default.createFile(atPath: log, contents: nil)
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        let upstream = URL(string: upstream)!
        // The kernel picks the port (a random one could be taken), and the proxy names it once it listens.
        let portFile = dir + "/port"
        process.arguments = ["python3", OpenStack.repository + "/scripts/test-proxy.py", "--listen", "0", "--port-file", portFile,
                             "--upstream", "\(upstream.host!):\(upstream.port!)", "--log", log, "--control", control]
        try Self.write(settings, to: control)
        try process.run()
        let deadline = Date().addingTimeInterval(30)
        var port: Int?
        while port == nil && process.isRunning && Date() < deadline {
            port = (try? String(contentsOfFile: portFile, encoding: .utf8)).flatMap { Int($0) }
            if port == nil { usleep(20_000) }
        }
        guard let port else {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            throw OpenStack.FixtureError("the test proxy did not start within 30 s")
        }
        self.port = port
    }

    public var url: String { "http://127.0.0.1:\(port)" }

    public func set(_ settings: [String: Any]) throws { try Self.write(settings, to: control) }

    static func write(_ settings: [String: Any], to control: String) throws {
        try JSONSerialization.data(withJSONObject: settings).write(to: URL(fileURLWithPath: control))
    }

    /// Requests seen, as "METHOD PATH RANGE" lines.
    public func requests() -> [String] {
        ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    /// SIGKILL: children of the test process may inherit a mask that blocks SIGTERM.
    public func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
}
