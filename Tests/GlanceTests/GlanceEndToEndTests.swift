import AsyncHTTPClient
import Crypto
import Foundation
import OpenStackFixture
import Synchronization
import Testing
@testable import Glance

/// Collects downloaded bytes in memory.
final class MemorySink: DownloadSink, @unchecked Sendable {
    private let lock = Mutex<[UInt8]>([])
    var bytes: [UInt8] { lock.withLock { $0 } }
    func write(_ b: UnsafeRawBufferPointer, at offset: UInt64) throws {
        lock.withLock { buf in
            precondition(UInt64(buf.count) == offset, "blocks must arrive in order")
            buf.append(contentsOf: b)
        }
    }
}

/// Fails every write after the first block, as a full disk does.
final class FullDiskSink: DownloadSink, @unchecked Sendable {
    struct DiskFull: Error, Equatable {}
    func write(_ b: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if offset > 0 { throw DiskFull() }
    }
}

/// Against the real Keystone 30 and Glance 33 of scripts/openstack-fixture.sh.
@Suite("glance end to end", .enabled(if: OpenStack.available), .serialized)
struct GlanceEndToEndTests {
    func client(apiServers: [String] = [], user: String = "admin", password: String = "secret", project: String = "admin",
                margin: TimeInterval = 120) -> (GlanceClient, KeystoneAuth) {
        let auth = KeystoneAuth(authURL: OpenStack.keystoneURL, credentials: .password(
            username: user, password: password, userDomain: "Default", project: project, projectDomain: "Default"),
            http: HTTPClient.shared, margin: margin)
        return (GlanceClient(http: HTTPClient.shared, endpoint: GlanceEndpoint(apiServers: apiServers, auth: auth)), auth)
    }

    /// An overloaded Keystone's 5xx is asked again (twice, backing off); a third 5xx, or any 4xx, is final.
    @Test func keystoneServerErrorsAreAskedAgain() async throws {
        for (fails, status, succeeds, requests) in [(2, 500, true, 3), (3, 503, false, 3), (1, 401, false, 1)] {
            let proxy = try TestProxy(settings: ["fail_status": status, "fails": fails, "fail_path": "/auth/tokens"],
                                      upstream: OpenStack.keystoneURL)
            defer { proxy.stop() }
            let auth = KeystoneAuth(authURL: proxy.url + "/v3", credentials: .password(
                username: "admin", password: "secret", userDomain: "Default", project: "admin", projectDomain: "Default"),
                http: HTTPClient.shared)
            do {
                let token = try await auth.token()
                #expect(succeeds && !token.value.isEmpty, "\(status) × \(fails)")
            } catch let GlanceError.authentication(got, _) {
                #expect(!succeeds && got == status, "\(status) × \(fails)")
            }
            #expect(proxy.requests().filter { $0.contains("/auth/tokens") }.count == requests, "\(status) × \(fails)")
        }
    }

    /// Uploads `bytes` and returns a client that reaches Glance through a test proxy with `settings`, the image's
    /// record, the proxy (stop it) and the id (delete it).
    func proxied(_ bytes: [UInt8], settings: [String: Any]) async throws -> (GlanceClient, GlanceImage, TestProxy, String) {
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        let proxy = try TestProxy(settings: settings)
        let (glance, _) = client(apiServers: [proxy.url])
        return (glance, try await glance.show(id), proxy, id)
    }

    @Test func tokensComeFromTheCatalogAndAreRenewed() async throws {
        let (glance, auth) = client()
        #expect(try await glance.baseURLs() == [OpenStack.glanceURL])
        let t1 = try await auth.token()
        #expect(try await auth.token().value == t1.value)
        #expect(await auth.issued == 1)
        // A token Glance rejected is replaced; one about to expire too (margin larger than its lifetime).
        let t2 = try await auth.token(rejected: t1.value)
        #expect(t2.value != t1.value)
        let (_, eager) = client(margin: 7200)
        _ = try await eager.token()
        _ = try await eager.token()
        #expect(await eager.issued == 2)
        // A wrong password is a clear authentication error.
        let (bad, _) = client(password: "wrong")
        await #expect(throws: GlanceError.self) { try await bad.list() }
        do { _ = try await bad.list() } catch let e as GlanceError {
            guard case let .authentication(status, _) = e else { Issue.record("\(e)"); return }
            #expect(status == 401)
        }
    }

    /// A token Keystone revoked before its expiry: Glance answers 401, the client renews the token once and the
    /// request goes through (the same code sends Cinder's requests).
    @Test func aRevokedTokenIsRenewedOnTheServices401() async throws {
        let id = try await OpenStack.createImage(OpenStack.testBytes(4096, seed: 5))["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (glance, auth) = client()
        let first = try await auth.token().value
        var revoke = HTTPClientRequest(url: OpenStack.keystoneURL + "/auth/tokens")
        revoke.method = .DELETE
        revoke.headers.add(name: "X-Auth-Token", value: try await OpenStack.token())
        revoke.headers.add(name: "X-Subject-Token", value: first)
        let revoked = try await HTTPClient.shared.execute(revoke, timeout: .seconds(30))
        #expect(revoked.status == .noContent)
        let image = try await glance.show(id)
        #expect(image.id == id)
        #expect(await auth.issued == 2)
        #expect(try await auth.token().value != first)
    }

    @Test func applicationCredentials() async throws {
        // Create one for the demo user through Keystone, then authenticate with it.
        let token = try await OpenStack.token(user: "demo", password: "demopw", project: "demo")
        var req = HTTPClientRequest(url: OpenStack.keystoneURL + "/auth/tokens")
        req.headers.add(name: "X-Auth-Token", value: token)
        req.headers.add(name: "X-Subject-Token", value: token)
        let me = try await HTTPClient.shared.execute(req, timeout: .seconds(30))
        let meBody = try JSONSerialization.jsonObject(with: Data(try await me.body.collect(upTo: 1 << 20).readableBytesView)) as! [String: Any]
        let userID = ((meBody["token"] as! [String: Any])["user"] as! [String: Any])["id"] as! String
        var create = HTTPClientRequest(url: OpenStack.keystoneURL + "/users/\(userID)/application_credentials")
        create.method = .POST
        create.headers.add(name: "X-Auth-Token", value: token)
        create.headers.add(name: "Content-Type", value: "application/json")
        // With the role the user holds named: by default Keystone copies every role of the token, implied ones
        // (reader) included, and once refused one it found no direct assignment for (HTTP 400).
        create.body = .bytes(.init(string: "{\"application_credential\":{\"name\":\"imgconv-\(UUID().uuidString.prefix(8))\",\"roles\":[{\"name\":\"member\"}]}}"))
        // Keystone's sqlite answers 5xx when this write overlaps another suite's: retried, as the fixture's
        // other writes are. A failure is recorded, never a crash of the whole test process.
        var created: [String: Any]?
        for _ in 0..<4 {
            let r = try await HTTPClient.shared.execute(create, timeout: .seconds(30))
            let data = Data(try await r.body.collect(upTo: 1 << 20).readableBytesView)
            created = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
            if r.status.code < 500 { break }
            try await Task.sleep(nanoseconds: 500_000_000)
        }
        let cred = try #require(created?["application_credential"] as? [String: Any], "\(String(describing: created))")
        let auth = KeystoneAuth(authURL: OpenStack.keystoneURL, credentials: .applicationCredential(
            id: cred["id"] as! String, secret: cred["secret"] as! String), http: HTTPClient.shared)
        let glance = GlanceClient(http: HTTPClient.shared, endpoint: GlanceEndpoint(auth: auth))
        _ = try await glance.list()
        #expect(await auth.issued == 1)
    }

    @Test func listsWithPaginationAndFilters() async throws {
        let tag = "page-\(UUID().uuidString.prefix(8))"
        var ids: [String] = []
        for i in 0..<5 {
            let img = try await OpenStack.createImage(Array("image \(i)".utf8), properties: i % 2 == 0 ? ["imgconv_test_even": "true"] : [:], tags: [tag])
            ids.append(img["id"] as! String)
        }
        let created = ids
        defer { Task { for id in created { await OpenStack.deleteImage(id) } } }
        let (glance, _) = client()
        let tagged = try await glance.list(filters: [("tag", tag)], pageSize: 2)
        #expect(Set(tagged.map(\.id)) == Set(ids))
        let even = try await glance.list(filters: [("tag", tag), ("imgconv_test_even", "true")], pageSize: 1)
        #expect(Set(even.map(\.id)) == Set([ids[0], ids[2], ids[4]]))
        let one = try await glance.show(ids[1])
        #expect(one.tags == [tag] && one.size == 7 && one.osHashAlgo == "sha512")
        await #expect(throws: GlanceError.imageNotFound("00000000-0000-0000-0000-000000000000")) {
            try await glance.show("00000000-0000-0000-0000-000000000000")
        }
    }

    @Test func downloadVerifiesTheMultihash() async throws {
        let bytes = OpenStack.testBytes(9 << 20 + 123, seed: 11)
        let img = try await OpenStack.createImage(bytes)
        let id = img["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (glance, _) = client()
        let image = try await glance.show(id)
        let sink = MemorySink()
        let r = try await VerifiedDownload(client: glance, image: image).run(into: sink)
        #expect(sink.bytes == bytes)
        // Glance records both; the sha512 multihash is verified and md5 is not computed next to it.
        #expect(image.checksum?.isEmpty == false)
        #expect(Array(r.hashes.keys) == ["sha512"] && r.hashes["sha512"] == image.osHashValue)
        #expect(r.hashes["sha512"] == SHA512.hash(data: bytes).map { String(format: "%02x", $0) }.joined())
        #expect(r.resumes == 0)
    }

    @Test func corruptedStoreIsRejected() async throws {
        let bytes = OpenStack.testBytes(3 << 20, seed: 12)
        let img = try await OpenStack.createImage(bytes)
        let id = img["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        // Change the stored bytes behind Glance's back (same size).
        let stored = OpenStack.storeDir + "/" + id
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: stored))
        try h.seek(toOffset: 2 << 20)
        h.write(Data("tampered".utf8))
        try h.close()
        let (glance, _) = client()
        let image = try await glance.show(id)
        await #expect(throws: GlanceError.self) { try await VerifiedDownload(client: glance, image: image).run(into: MemorySink()) }
        do {
            _ = try await VerifiedDownload(client: glance, image: image).run(into: MemorySink())
        } catch let GlanceError.integrity(_, algorithm, expected, actual) {
            #expect(algorithm == "sha512" && expected == image.osHashValue && actual != expected)
        }
    }

    @Test func resumesWithRangeAfterACutConnection() async throws {
        let bytes = OpenStack.testBytes(12 << 20, seed: 13)
        let (glance, image, proxy, id) = try await proxied(bytes, settings: ["cut_after": 5_000_000, "cuts": 2])
        defer { proxy.stop(); Task { await OpenStack.deleteImage(id) } }
        let sink = MemorySink()
        let r = try await VerifiedDownload(client: glance, image: image, retry: RetryPolicy(attempts: 3, baseDelay: 0.05)).run(into: sink)
        #expect(sink.bytes == bytes)
        #expect(r.resumes == 2 && r.rangeIgnored == 0)
        let files = proxy.requests().filter { $0.contains("/file") }
        #expect(files.count == 3)
        // Each resume starts where the bytes received so far end (at most where the proxy cut).
        let starts = files.map { line in line.split(separator: "=").last.flatMap { UInt64($0.dropLast()) } ?? 0 }
        #expect(files[0].hasSuffix(" -"))
        #expect(starts[1] > 0 && starts[1] <= 5_000_000)
        #expect(starts[2] > starts[1] && starts[2] <= starts[1] + 5_000_000)
    }

    @Test func detectsAServerThatIgnoresRange() async throws {
        let bytes = OpenStack.testBytes(6 << 20, seed: 14)
        let (glance, image, proxy, id) = try await proxied(bytes, settings: ["cut_after": 2_500_000, "cuts": 1, "ignore_range": true])
        defer { proxy.stop(); Task { await OpenStack.deleteImage(id) } }
        let sink = MemorySink()
        let r = try await VerifiedDownload(client: glance, image: image, retry: RetryPolicy(attempts: 3, baseDelay: 0.05)).run(into: sink)
        #expect(sink.bytes == bytes)
        #expect(r.resumes == 1 && r.rangeIgnored == 1)
    }

    @Test func aFailingSinkIsNotRetried() async throws {
        let (glance, image, proxy, id) = try await proxied(OpenStack.testBytes(12 << 20, seed: 16), settings: [:])
        defer { proxy.stop(); Task { await OpenStack.deleteImage(id) } }
        await #expect(throws: FullDiskSink.DiskFull()) {
            try await VerifiedDownload(client: glance, image: image, retry: RetryPolicy(attempts: 3, baseDelay: 0.05)).run(into: FullDiskSink())
        }
        #expect(proxy.requests().filter { $0.contains("/file") }.count == 1)
    }

    @Test func givesUpWithAClearError() async throws {
        // Every response is cut before any data: no progress, so the attempts run out.
        let (glance, image, proxy, id) = try await proxied(OpenStack.testBytes(4 << 20, seed: 15), settings: ["cut_after": 1, "cuts": 1000])
        defer { proxy.stop(); Task { await OpenStack.deleteImage(id) } }
        do {
            _ = try await VerifiedDownload(client: glance, image: image, retry: RetryPolicy(attempts: 2, baseDelay: 0.05)).run(into: MemorySink())
            Issue.record("download succeeded through a proxy that cuts every response")
        } catch let GlanceError.transport(_, attempts, detail) {
            #expect(attempts == 3)
            #expect(!detail.isEmpty)
        }
    }
}
