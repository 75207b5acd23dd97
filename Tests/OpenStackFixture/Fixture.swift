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
        let r = try await HTTPClient.shared.execute(req, timeout: .seconds(60))
        _ = try await r.body.collect(upTo: 16 << 20)
        guard let t = r.headers.first(name: "X-Subject-Token") else { throw FixtureError("no token for \(user): \(r.status)") }
        return t
    }

    public struct FixtureError: Error, CustomStringConvertible {
        public var description: String
        public init(_ d: String) { description = d }
    }

    /// Sends a request to Glance as admin; returns the status and the JSON body (if any).
    @discardableResult
    public static func glance(_ method: String, _ path: String, json: Any? = nil, body: [UInt8]? = nil,
                              contentType: String? = nil) async throws -> (Int, Any?) {
        var req = HTTPClientRequest(url: glanceURL + path)
        req.method = .init(rawValue: method)
        req.headers.add(name: "X-Auth-Token", value: try await token())
        if let json {
            req.headers.add(name: "Content-Type", value: contentType ?? "application/json")
            req.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: json)))
        } else if let body {
            req.headers.add(name: "Content-Type", value: "application/octet-stream")
            req.body = .bytes(ByteBuffer(bytes: body))
        }
        let r = try await HTTPClient.shared.execute(req, timeout: .seconds(300))
        let data = try await r.body.collect(upTo: 64 << 20)
        let o = data.readableBytes > 0 ? try? JSONSerialization.jsonObject(with: Data(data.readableBytesView)) : nil
        return (Int(r.status.code), o)
    }

    /// Creates an image with extra properties and tags, uploads the bytes, and returns its record.
    public static func createImage(_ bytes: [UInt8], diskFormat: String = "raw", name: String = "imgconv-test",
                                   properties: [String: String] = [:], tags: [String] = []) async throws -> [String: Any] {
        var meta: [String: Any] = ["name": name, "disk_format": diskFormat, "container_format": "bare", "tags": tags]
        for (k, v) in properties { meta[k] = v }
        let (status, o) = try await glance("POST", "/v2/images", json: meta)
        guard status == 201, let created = o as? [String: Any], let id = created["id"] as? String else {
            throw FixtureError("create image: HTTP \(status) \(String(describing: o))")
        }
        let (up, err) = try await glance("PUT", "/v2/images/\(id)/file", body: bytes)
        guard up == 204 else { throw FixtureError("upload: HTTP \(up) \(String(describing: err))") }
        let (_, shown) = try await glance("GET", "/v2/images/\(id)")
        return shown as! [String: Any]
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

    public init(settings: [String: Any] = [:]) throws {
        port = 20000 + Int.random(in: 0..<20000)
        let dir = NSTemporaryDirectory() + "imgconv-proxy-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        log = dir + "/requests.log"
        control = dir + "/control.json"
        FileManager.default.createFile(atPath: log, contents: nil)
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        let upstream = URL(string: OpenStack.glanceURL)!
        process.arguments = ["python3", OpenStack.repository + "/scripts/test-proxy.py", "--listen", "\(port)",
                             "--upstream", "\(upstream.host!):\(upstream.port!)", "--log", log, "--control", control]
        try set(settings)
        try process.run()
        for _ in 0..<100 {
            if OpenStack.answers("\(url)/healthcheck") { return }
            usleep(50_000)
        }
        throw OpenStack.FixtureError("the test proxy did not start on \(port)")
    }

    public var url: String { "http://127.0.0.1:\(port)" }

    public func set(_ settings: [String: Any]) throws {
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
