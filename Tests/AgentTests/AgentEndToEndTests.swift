import Crypto
import Foundation
import OpenStackFixture
import Testing
#if canImport(Glibc)
import Glibc
#endif

func sha512Hex(_ b: [UInt8]) -> String { SHA512.hash(data: b).map { String(format: "%02x", $0) }.joined() }

/// `imgconv agent` against the real Keystone and Glance: the daemon process, its socket, its cache directory.
@Suite("agent end to end", .enabled(if: OpenStack.available), .serialized)
struct AgentEndToEndTests {
    @Test func prefetchesByIDPropertyAndTag() async throws {
        let suffix = UUID().uuidString.prefix(8).lowercased()
        let property = "imgconv_prefetch_\(suffix)", tag = "golden-\(suffix)"
        let a = OpenStack.testBytes(3 << 20, seed: 21), b = OpenStack.testBytes(2 << 20 + 7, seed: 22)
        let c = [UInt8](FileManager.default.contents(atPath: OpenStack.repository + "/samples/qcow2-zlib.qcow2")!)
        let ia = try await OpenStack.createImage(a)["id"] as! String
        let ib = try await OpenStack.createImage(b, properties: [property: "true"])["id"] as! String
        let ic = try await OpenStack.createImage(c, diskFormat: "qcow2", tags: [tag])["id"] as! String
        let idle = try await OpenStack.createImage(OpenStack.testBytes(1 << 20, seed: 23), properties: [property: "false"])["id"] as! String
        defer { Task { for id in [ia, ib, ic, idle] { await OpenStack.deleteImage(id) } } }
        let agent = try AgentProcess(["prefetch": ["images": ia, "property": property, "tag": tag, "interval": "1", "concurrency": "2"]])
        try agent.start()
        defer { agent.stop() }
        for (id, bytes) in [(ia, a), (ib, b), (ic, c)] {
            let img = try await agent.waitForImage(id)
            #expect(img["state"] as? String == "ready", "\(img)")
            #expect(img["os_hash_value"] as? String == sha512Hex(bytes))
            // Nova's _base layout: sha1(image id), the bytes exactly as Glance stores them.
            let path = agent.cacheDir + "/" + sha1Hex(id)
            #expect(img["path"] as? String == path)
            #expect(FileManager.default.contents(atPath: path) == Data(bytes))
        }
        #expect(try agent.image(idle) == nil)
        #expect(agent.cacheFiles().count == 3)
        #expect(OpenStack.fileRequests(ia) == 1)
    }

    /// `[prefetch] bandwidth_limit` is one rate for all prefetches: 4 images of 3 MiB (each less than one 4 MiB
    /// download block, so only the charge for a download's last block paces them) fetched 4 at a time at 4 MiB/s
    /// take at least 12/4 s together. Before, a download's last block was never charged and they took ~0.3 s.
    @Test func prefetchesShareOneBandwidthLimit() async throws {
        let tag = "limited-\(UUID().uuidString.prefix(8).lowercased())"
        var created: [String] = []
        for seed in 0..<4 {
            created.append(try await OpenStack.createImage(OpenStack.testBytes(3 << 20, seed: UInt64(40 + seed)), tags: [tag])["id"] as! String)
        }
        let ids = created
        defer { Task { for id in ids { await OpenStack.deleteImage(id) } } }
        let agent = try AgentProcess(["prefetch": ["tag": tag, "interval": "1h", "concurrency": "4", "bandwidth_limit": "4M"]])
        let t0 = Date()
        try agent.start()
        defer { agent.stop() }
        for id in ids {
            let img = try await agent.waitForImage(id)
            #expect(img["state"] as? String == "ready", "\(img)")
        }
        let took = Date().timeIntervalSince(t0)
        // Sleeps never end early, so the lower bound holds under any load; the upper one is a hang guard.
        #expect(took >= 2.95 && took < 120, "12 MiB at 4 MiB/s took \(took) s")
    }

    @Test func fiftyConcurrentRequestsMakeOneDownload() async throws {
        let bytes = OpenStack.testBytes(16 << 20, seed: 31)
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        // The proxy slows the body down (32 MB/s) so the requests overlap the download.
        let proxy = try TestProxy(settings: ["rate": 32 << 20])
        defer { proxy.stop() }
        let agent = try AgentProcess(["glance": ["api_servers": proxy.url]])
        try agent.start()
        defer { agent.stop() }
        let statuses = Mutex50()
        DispatchQueue.concurrentPerform(iterations: 50) { _ in
            let (s, _) = (try? agent.request("PUT", "/v1/images/\(id)")) ?? (0, nil)
            statuses.append(s)
        }
        let img = try await agent.waitForImage(id)
        #expect(img["state"] as? String == "ready")
        #expect(statuses.values.allSatisfy { $0 == 200 || $0 == 202 }, "\(statuses.values)")
        #expect(statuses.values.filter { $0 == 202 }.count >= 2)
        #expect(proxy.requests().filter { $0.hasPrefix("GET ") && $0.contains("/file") }.count == 1)
        #expect(OpenStack.fileRequests(id) == 1)
        #expect(FileManager.default.contents(atPath: img["path"] as! String) == Data(bytes))
        // Every job for the image is the same job.
        let (_, jobs) = try agent.request("GET", "/v1/jobs")
        let mine = ((jobs as! [String: Any])["jobs"] as! [[String: Any]]).filter { $0["image_id"] as? String == id }
        #expect(mine.count == 1 && mine[0]["state"] as? String == "ready" && mine[0]["bytes_done"] as? Int == bytes.count)
    }

    @Test func corruptedStoreIsRejectedAndNeverServed() async throws {
        let bytes = OpenStack.testBytes(5 << 20, seed: 41)
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: OpenStack.storeDir + "/" + id))
        try h.seek(toOffset: 4 << 20)
        h.write(Data("behind glance's back".utf8))
        try h.close()
        let agent = try AgentProcess()
        try agent.start()
        defer { agent.stop() }
        let (s, _) = try agent.request("PUT", "/v1/images/\(id)")
        #expect(s == 202)
        let img = try await agent.waitForImage(id)
        #expect(img["state"] as? String == "error")
        #expect((img["error"] as? String ?? "").contains("sha512"))
        #expect(img["path"] == nil)
        #expect(agent.cacheFiles() == [])
        // The CLI says so and fails.
        let r = try shell([imgconvBinary, "cache", "fetch", "--wait", "--socket", agent.socket, id])
        #expect(r.status != 0 && r.err.contains("sha512"))
    }

    @Test func resumesAfterACutConnection() async throws {
        let bytes = OpenStack.testBytes(24 << 20, seed: 51)
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let proxy = try TestProxy(settings: ["cut_after": 7_000_000, "cuts": 2])
        defer { proxy.stop() }
        let agent = try AgentProcess(["glance": ["api_servers": proxy.url]])
        try agent.start()
        defer { agent.stop() }
        let r = try shell([imgconvBinary, "cache", "fetch", "--wait", "--socket", agent.socket, id])
        #expect(r.status == 0, "\(r.err)")
        let img = try agent.image(id)!
        #expect(FileManager.default.contents(atPath: img["path"] as! String) == Data(bytes))
        let ranged = proxy.requests().filter { $0.contains("/file") && $0.contains("bytes=") }
        #expect(ranged.count == 2)
        let (_, metrics) = try agent.request("GET", "/metrics")
        _ = metrics
        let text = try shell(["curl", "-s", "--unix-socket", agent.socket, "http://agent/metrics"]).out
        #expect(text.contains("imgconv_download_resumes_total 2"))
        #expect(text.contains("imgconv_bytes_fetched_total"))
    }

    /// After a download, an idle agent gives the freed buffers back (`memory_trim_idle`), once, and advises the
    /// pages of its code out (`memory_trim_code`; whether the kernel drops them depends on who else maps them:
    /// ResidencyTests checks the dropping, bench/memory.sh measures it).
    @Test func idleAgentTrimsItsMemory() async throws {
        let bytes = OpenStack.testBytes(24 << 20, seed: 52)
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let agent = try AgentProcess(["agent": ["memory_trim_idle": "1"]])
        try agent.start()
        defer { agent.stop() }
        func metric(_ name: String) throws -> Int? {
            let text = try shell(["curl", "-s", "--unix-socket", agent.socket, "http://agent/metrics"]).out
            return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Int($0.split(separator: " ")[1]) }
        }
        #expect(try metric("process_resident_memory_bytes") ?? 0 > 1 << 20)
        let r = try shell([imgconvBinary, "cache", "fetch", "--wait", "--socket", agent.socket, id])
        #expect(r.status == 0, "\(r.err)")
        let deadline = Date().addingTimeInterval(20)
        var trims = 0
        while trims == 0 && Date() < deadline {
            try await Task.sleep(nanoseconds: 500_000_000)
            trims = try metric("imgconv_memory_trims_total") ?? 0
        }
        #expect(trims >= 1, "no trim after the download: \(agent.log().suffix(2000))")
        #expect(agent.log().contains("returned freed memory"))
        // The executable's and the Swift runtime's read-only mappings alone are over 16 MiB.
        #expect(try metric("imgconv_memory_trim_paged_out_bytes") ?? 0 > 16 << 20)
    }

    @Test func evictsUnderASmallLimit() async throws {
        var ids: [String] = []
        for i in 0..<4 { ids.append(try await OpenStack.createImage(OpenStack.testBytes(4 << 20, seed: 60 + UInt64(i)))["id"] as! String) }
        let created = ids
        defer { Task { for id in created { await OpenStack.deleteImage(id) } } }
        let agent = try AgentProcess(["cache": ["max_size": "10M", "layout": "id"]])
        try agent.start()
        defer { agent.stop() }
        for id in ids[0..<2] { _ = try shell([imgconvBinary, "cache", "fetch", "--wait", "--socket", agent.socket, id]) }
        #expect(agent.cacheFiles() == ids[0..<2].sorted())
        #expect(try shell([imgconvBinary, "cache", "pin", "--socket", agent.socket, ids[0]]).status == 0)
        // The third needs room: ids[1] (unpinned) goes, ids[0] (pinned, older) stays.
        _ = try shell([imgconvBinary, "cache", "fetch", "--wait", "--socket", agent.socket, ids[2]])
        #expect(agent.cacheFiles() == [ids[0], ids[2]].sorted())
        #expect(try agent.image(ids[1]) == nil)
        // Pin the third too: the fourth cannot fit, and says so.
        _ = try agent.request("PUT", "/v1/images/\(ids[2])/pin")
        let r = try shell([imgconvBinary, "cache", "fetch", "--wait", "--socket", agent.socket, ids[3]])
        #expect(r.status != 0 && r.err.contains("max_size"), "\(r.err)")
        #expect(agent.cacheFiles() == [ids[0], ids[2]].sorted())
        // Evicting a pinned image is refused; after unpinning it works.
        #expect(try agent.request("DELETE", "/v1/images/\(ids[0])").0 == 409)
        #expect(try agent.request("DELETE", "/v1/images/\(ids[0])/pin").0 == 200)
        #expect(try agent.request("DELETE", "/v1/images/\(ids[0])").0 == 204)
        #expect(agent.cacheFiles() == [ids[2]])
    }

    @Test func killNineMidDownloadThenRestart() async throws {
        let bytes = OpenStack.testBytes(32 << 20, seed: 71)
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let proxy = try TestProxy(settings: ["rate": 4 << 20])
        defer { proxy.stop() }
        let agent = try AgentProcess(["glance": ["api_servers": proxy.url]])
        try agent.start()
        #expect(try agent.request("PUT", "/v1/images/\(id)").0 == 202)
        var seen = 0
        for _ in 0..<100 {
            seen = (try agent.image(id)?["bytes_done"] as? Int) ?? 0
            if seen > 4 << 20 { break }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        #expect(seen > 0)
        #expect(agent.cacheFiles().contains { $0.contains(".imgconv-") }, "a temporary file while downloading")
        agent.kill9()
        // Nothing under the final name, only the temporary file a crash leaves.
        #expect(!agent.cacheFiles().contains(sha1Hex(id)))
        try proxy.set([:])
        try agent.start()
        defer { agent.stop() }
        #expect(agent.cacheFiles() == [], "start-up removes the orphan")
        #expect(try agent.image(id) == nil, "an interrupted fetch is never ready")
        _ = try agent.request("PUT", "/v1/images/\(id)")
        let img = try await agent.waitForImage(id)
        #expect(img["state"] as? String == "ready")
        #expect(FileManager.default.contents(atPath: img["path"] as! String) == Data(bytes))
        #expect(agent.cacheFiles() == [sha1Hex(id)])
    }

    @Test func socketPermissionsAndPeerCredentials() async throws {
        let agent = try AgentProcess(["agent": ["socket_mode": "0666", "allowed_uids": "4242"]])
        try agent.start()
        defer { agent.stop() }
        var st = stat()
        #expect(stat(agent.socket, &st) == 0 && st.st_mode & 0o777 == 0o666)
        #expect(try agent.request("GET", "/v1/health").0 == 200)
        guard getuid() == 0 else { return }
        // nobody may open the socket (mode 0666) but is not an allowed peer.
        let (s, o) = try agent.request("GET", "/v1/images", asUser: 65534)
        #expect(s == 403)
        #expect(((o as? [String: Any])?["error"] as? [String: Any])?["message"] as? String != nil)
        #expect(try agent.request("GET", "/v1/health", asUser: 4242).0 == 200)
        // With the default mode 0660 (owner root), nobody cannot even connect.
        let strict = try AgentProcess()
        try strict.start()
        defer { strict.stop() }
        #expect(stat(strict.socket, &st) == 0 && st.st_mode & 0o777 == 0o660)
        #expect(try strict.request("GET", "/v1/health", asUser: 65534).0 == 0)
    }

    @Test func badIDsAndUnknownImages() async throws {
        let agent = try AgentProcess()
        try agent.start()
        defer { agent.stop() }
        for bad in ["nonsense", "..%2F..%2Fetc%2Fpasswd", "198f71f9-53e4-45b9-916d-5ea25ee3abf2x"] {
            #expect(try agent.request("PUT", "/v1/images/\(bad)").0 == 400, "\(bad)")
            #expect(try agent.request("GET", "/v1/images/\(bad)").0 == 400, "\(bad)")
            #expect(try agent.request("DELETE", "/v1/images/\(bad)").0 == 400, "\(bad)")
            #expect(try agent.request("PUT", "/v1/images/\(bad)/pin").0 == 400, "\(bad)")
            #expect(try agent.request("GET", "/v1/jobs/\(bad)").0 == 400, "\(bad)")
        }
        let unknown = "00000000-0000-4000-8000-000000000000"
        #expect(try agent.request("PUT", "/v1/images/\(unknown)").0 == 404)
        #expect(try agent.request("GET", "/v1/images/\(unknown)").0 == 404)
        #expect(try agent.request("DELETE", "/v1/images/\(unknown)").0 == 404)
        #expect(try agent.request("GET", "/v1/jobs/\(unknown)").0 == 404)
        #expect(agent.cacheFiles() == [])
    }

    @Test func hostileImageFromGlanceIsRefused() async throws {
        // A qcow2 registered as raw (CVE-2024-40767): Glance accepts it, the agent must not.
        let qcow = [UInt8](FileManager.default.contents(atPath: OpenStack.repository + "/samples/qcow2-v3.qcow2")!)
        let id = try await OpenStack.createImage(qcow, diskFormat: "raw")["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let agent = try AgentProcess()
        try agent.start()
        defer { agent.stop() }
        _ = try agent.request("PUT", "/v1/images/\(id)")
        let img = try await agent.waitForImage(id)
        #expect(img["state"] as? String == "error")
        #expect((img["error"] as? String ?? "").contains("format-mismatch"))
        #expect(agent.cacheFiles() == [])
    }

    @Test func eventsStreamAndGracefulShutdown() async throws {
        let bytes = OpenStack.testBytes(2 << 20, seed: 81)
        let id = try await OpenStack.createImage(bytes)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let agent = try AgentProcess()
        try agent.start()
        let events = Process()
        events.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        events.arguments = ["curl", "-s", "-N", "-m", "30", "--unix-socket", agent.socket, "http://agent/v1/events"]
        let pipe = Pipe()
        events.standardOutput = pipe
        try events.run()
        try await Task.sleep(nanoseconds: 300_000_000)
        _ = try agent.request("PUT", "/v1/images/\(id)")
        _ = try await agent.waitForImage(id)
        try await Task.sleep(nanoseconds: 300_000_000)
        // SIGTERM ends the event stream, removes the socket and exits 0.
        #expect(agent.stop() == 0)
        events.waitUntilExit()
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(text.contains("event: job"))
        #expect(text.contains("\"state\":\"fetching\""))
        #expect(text.contains("\"state\":\"ready\""))
        #expect(!FileManager.default.fileExists(atPath: agent.socket))
    }

    @Test func badConfigStopsStartup() throws {
        let agent = try AgentProcess(["cache": ["max_sise": "1G"]])
        let r = try shell([imgconvBinary, "agent", "--config", agent.configPath])
        #expect(r.status == 2)
        #expect(r.err.contains("[cache] max_sise: unknown key"))
    }
}

/// Statuses collected from concurrent requests.
final class Mutex50: @unchecked Sendable {
    private let lock = NSLock()
    private var v: [Int] = []
    func append(_ s: Int) { lock.lock(); v.append(s); lock.unlock() }
    var values: [Int] { lock.lock(); defer { lock.unlock() }; return v }
}
