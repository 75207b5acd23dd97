import CephFixture
import Foundation
import OpenStackFixture
import Testing

/// Every store of a multi-store Glance (file1, ceph1, s3rgw on the cluster's RADOS Gateway, web: http), each a
/// real glance_store driver: the agent downloads through Glance's `/v2/images/{id}/file` whichever store holds the
/// image, and makes boot disks from it.
@Suite("every Glance store", .enabled(if: OpenStack.available && Ceph.available && OpenStack.s3Store != nil), .serialized)
struct GlanceStoreTests {
    /// For each store, a raw image: the agent fetches and verifies it into its cache, and another agent (nothing
    /// cached) makes a disk whose bytes are the image's, by the path the store allows: a clone of Glance's own
    /// snapshot for ceph1, a base built from what Glance streams for the others.
    @Test(arguments: ["file1", "ceph1", "s3rgw", "web"])
    func fetchAndBootFromEachStore(store: String) async throws {
        let bytes = OpenStack.testBytes((6 << 20) + 4096, seed: UInt64(store.utf8.reduce(0) { $0 &* 31 &+ UInt64($1) }))
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "store-\(store)", inStore: store)
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        #expect(image["stores"] as? String == store, "\(image)")

        let cache = try AgentProcess()
        try cache.start()
        defer { cache.stop() }
        #expect([200, 202].contains(try cache.request("PUT", "/v1/images/\(id)").0))
        let fetched = try await cache.waitForImage(id)
        #expect(fetched["state"] as? String == "ready", "\(fetched) \(cache.log().suffix(2000))")
        #expect(FileManager.default.contents(atPath: fetched["path"] as? String ?? "") == Data(bytes))

        let disks = try AgentProcess.rbd()
        defer { disks.stop() }
        let instance = UUID().uuidString.lowercased()
        let (status, o) = try disks.request("POST", "/v1/disks", json: diskBody(instance, id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201, "\(disk) \(disks.log().suffix(2000))")
        #expect(disk["method"] as? String == (store == OpenStack.rbdStore ? "glance-clone" : "base-built"), "\(disk)")
        let path = NSTemporaryDirectory() + "store-\(instance).raw"
        try Ceph.export("vms/\(instance)_disk", to: path)
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(FileManager.default.contents(atPath: path) == Data(bytes))
        #expect(try disks.request("DELETE", "/v1/disks/\(instance)_disk").0 == 204)
        _ = try disks.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    /// Glance's s3 (and http) store refuses Range requests: 400 "Getting images randomly from this store is not
    /// supported". A download from the gateway whose connection drops asks for the rest once, is refused, starts
    /// again from the beginning (skipping what it has: the hash already covers it), and ends verified.
    @Test func aCutDownloadFromS3StartsOverWhenGlanceRefusesTheRange() async throws {
        let store = try #require(OpenStack.s3Store)
        let bytes = OpenStack.testBytes(24 << 20, seed: 61)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "store-s3-cut", inStore: store)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let proxy = try TestProxy(settings: ["cut_after": 7_000_000, "cuts": 1])
        defer { proxy.stop() }
        let agent = try AgentProcess(["glance": ["api_servers": proxy.url]])
        try agent.start()
        defer { agent.stop() }
        _ = try agent.request("PUT", "/v1/images/\(id)")
        let img = try await agent.waitForImage(id)
        #expect(img["state"] as? String == "ready", "\(img) \(agent.log().suffix(2000))")
        #expect(FileManager.default.contents(atPath: img["path"] as? String ?? "") == Data(bytes))
        // The cut whole body, one Range request (refused by Glance), the whole body again.
        let gets = proxy.requests().filter { $0.hasPrefix("GET ") && $0.contains("/file") }
        #expect(gets.count == 3, "\(gets)")
        #expect(gets.map { $0.hasSuffix(" -") } == [true, false, true], "\(gets)")
        #expect(agent.log().contains("the store refused a Range request"))
    }

    /// Kills or starts the cluster's RADOS Gateway (scripts/ceph-cluster.sh rgw-kill|rgw-start).
    func gateway(_ action: String) throws {
        let r = try shell(["bash", OpenStack.repository + "/scripts/ceph-cluster.sh", "rgw-\(action)"])
        guard r.status == 0 else { throw OpenStack.FixtureError("rgw-\(action): \(r.err)") }
    }

    /// The gateway behind the s3 store dies (SIGKILL: a graceful stop lets the running GET finish) in the middle of
    /// a download and comes back a few seconds later:
    /// Glance fails the stream, answers errors while S3 is gone and refuses the Range; the agent backs off, starts
    /// again from the beginning and ends verified. Gone for good, the fetch ends in a clear error once its retries
    /// (num_retries) are spent.
    @Test(arguments: [true, false])
    func theGatewayStopsMidDownload(comesBack: Bool) async throws {
        let store = try #require(OpenStack.s3Store)
        let bytes = OpenStack.testBytes(64 << 20, seed: comesBack ? 77 : 78)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "store-s3-outage", inStore: store)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let proxy = try TestProxy(settings: ["rate": 4 << 20])  // about 16 s of download
        defer { proxy.stop() }
        // Glance keeps its response open but silent when S3 dies under it: read_timeout ends the wait.
        let agent = try AgentProcess(["glance": ["api_servers": proxy.url, "num_retries": "6", "read_timeout": "10"]])
        try agent.start()
        defer { agent.stop() }
        defer { try? gateway("start") }  // whatever happens, the next test has its gateway
        _ = try agent.request("PUT", "/v1/images/\(id)")
        for _ in 0..<200 where ((try agent.image(id))?["bytes_done"] as? Int ?? 0) < 4 << 20 { try await Task.sleep(for: .milliseconds(50)) }
        let stopped = Date()
        try gateway("kill")
        if comesBack {
            try await Task.sleep(for: .seconds(3))
            try gateway("start")
        }
        let img = try await agent.waitForImage(id, timeout: 240)
        let took = Date().timeIntervalSince(stopped)
        if comesBack {
            #expect(img["state"] as? String == "ready", "\(img) \(agent.log().suffix(3000))")
            #expect(FileManager.default.contents(atPath: img["path"] as? String ?? "") == Data(bytes))
            #expect(agent.log().contains("download interrupted"), "the outage did not reach the download")
        } else {
            #expect(img["state"] as? String == "error", "\(img)")
            #expect((img["error"] as? String ?? "").contains("attempts"), "\(img)")
            // A silent stream ends after read_timeout (10 s); 6 retries back off 0.5 + 1 + 2 + 4 + 8 + 8 s, plus the
            // requests themselves (Glance's own S3 client retries a refused connection before it answers).
            #expect(took < 150, "the fetch failed \(took) s after the gateway stopped")
            #expect(agent.cacheFiles().filter { $0.hasPrefix(".") }.isEmpty, "\(agent.cacheFiles())")
        }
    }

    /// `[glance] prefer_stores`: Glance 33 takes `?prefer=` (asked once, with a store that cannot exist and a
    /// Range past the end: no data moves), so downloads carry it; a Glance that ignores the parameter (the proxy
    /// strips it, as an older Glance would ignore it) is asked once and then sent nothing.
    @Test(arguments: [true, false])
    func preferStoresIsSentOnlyToAGlanceThatTakesIt(supported: Bool) async throws {
        let rbd = try #require(OpenStack.rbdStore)
        let bytes = OpenStack.testBytes((2 << 20) + 512, seed: supported ? 75 : 76)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "prefer", inStore: rbd)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let proxy = try TestProxy(settings: ["strip_query": !supported])
        defer { proxy.stop() }
        let agent = try AgentProcess(["glance": ["api_servers": proxy.url, "prefer_stores": "\(rbd),file1"]])
        try agent.start()
        defer { agent.stop() }
        _ = try agent.request("PUT", "/v1/images/\(id)")
        let img = try await agent.waitForImage(id)
        #expect(img["state"] as? String == "ready", "\(img) \(agent.log().suffix(2000))")
        #expect(FileManager.default.contents(atPath: img["path"] as? String ?? "") == Data(bytes))
        #expect(img["stores"] as? [String] == [rbd], "\(img)")
        let files = proxy.requests().filter { $0.contains("/v2/images/\(id)/file") }
        #expect(files.filter { $0.contains("prefer=imgconv-probe") }.count == 1, "\(files)")
        let downloads = files.filter { !$0.contains("prefer=imgconv-probe") }
        #expect(downloads.count == 1, "\(files)")
        #expect(downloads.allSatisfy { $0.contains("?prefer=\(rbd),file1") == supported }, "\(files)")
    }

    /// Glance's import requests for `id` (copy-image), from its access log.
    func importRequests(_ id: String) -> Int {
        let log = (try? String(contentsOfFile: OpenStack.accessLog, encoding: .utf8)) ?? ""
        return log.split(separator: "\n").filter { $0.contains("POST /v2/images/\(id)/import") }.count
    }

    func exported(_ disk: [String: Any]) throws -> Data? {
        let path = NSTemporaryDirectory() + "copy-\(UUID().uuidString.prefix(8)).raw"
        try Ceph.export(disk["location"] as? String ?? "", to: path)
        defer { try? FileManager.default.removeItem(atPath: path) }
        return FileManager.default.contents(atPath: path)
    }

    /// copy-to-store: a raw image only in the file store. Three agents ask for a disk at once; Glance gets one
    /// copy-image request, copies the image into the rbd store, and every disk is a clone of Glance's copy (those
    /// that ask after the copy is done see an ordinary rbd image).
    @Test func copyToStoreAsksGlanceOnceAndClonesTheCopy() async throws {
        let rbd = try #require(OpenStack.rbdStore)
        let bytes = OpenStack.testBytes((5 << 20) + 512, seed: 71)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "copy-to-store", inStore: "file1")["id"] as! String
        let agents = try (0..<3).map { _ in try AgentProcess.rbd(["glance": ["copy_to_store": rbd]]) }
        defer { for a in agents { a.stop() } }
        let calls = agents.map { a in
            onThread { () -> (Int, Data) in
                let (s, o) = try a.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
                return (s, (try? JSONSerialization.data(withJSONObject: o ?? [:])) ?? Data())
            }
        }
        var disks: [[String: Any]] = []
        for (i, c) in calls.enumerated() {
            let (status, json) = try await c.value
            let disk = (try? JSONSerialization.jsonObject(with: json)) as? [String: Any] ?? [:]
            #expect(status == 201, "\(disk) \(agents[i].log().suffix(2000))")
            disks.append(disk)
        }
        // An agent that looks after Glance has finished the copy finds the image in the rbd store and clones it as
        // any rbd image ("glance-clone"); what must hold is one copy, asked for once, and every disk a clone of it.
        let methods = disks.map { $0["method"] as? String ?? "" }
        #expect(methods.contains("copy-to-store"), "\(disks)")
        #expect(methods.allSatisfy { $0 == "copy-to-store" || $0 == "glance-clone" }, "\(disks)")
        #expect(disks.allSatisfy { $0["parent"] as? String == "images/\(id)@snap" }, "\(disks)")
        #expect(importRequests(id) == 1)
        let (_, shown) = try await OpenStack.glance("GET", "/v2/images/\(id)")
        #expect(Set(((shown as? [String: Any])?["stores"] as? String ?? "").split(separator: ",").map(String.init)) == ["file1", rbd])
        for disk in disks { #expect(try exported(disk) == Data(bytes)) }
        for (a, disk) in zip(agents, disks) { _ = try a.request("DELETE", "/v1/disks/\(disk["name"] as? String ?? "")") }
        await OpenStack.deleteImage(id)
    }

    /// copy-image is admin-only by Glance's default policy: an agent whose user is a plain member gets 403, builds
    /// the shared base instead, and says why in the disk's JSON.
    @Test func copyToStoreRefusedByPolicyFallsBackToTheBase() async throws {
        let rbd = try #require(OpenStack.rbdStore)
        let bytes = OpenStack.testBytes((3 << 20) + 512, seed: 72)
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "copy-refused", properties: ["visibility": "public"],
                                                    store: "file1")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess.rbd(["glance": ["copy_to_store": rbd, "username": "demo", "password": "demopw", "project_name": "demo"]])
        defer { a.stop() }
        let (status, o) = try a.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201, "\(disk) \(a.log().suffix(2000))")
        #expect(disk["method"] as? String == "base-built", "\(disk)")
        #expect((disk["fallback"] as? String ?? "").contains("403"), "\(disk)")
        #expect(a.log().contains("copy-to-store not used"))
        #expect(try exported(disk) == Data(bytes))
        _ = try a.request("DELETE", "/v1/disks/\(disk["name"] as? String ?? "")")
        _ = try a.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    /// A copy Glance accepts and then fails (the http store is read-only: os_glance_failed_import names it) falls
    /// back at once, not at the timeout.
    @Test func aFailedCopyFallsBackWithoutWaitingForTheTimeout() async throws {
        let web = try #require(OpenStack.webStore)
        let bytes = OpenStack.testBytes((2 << 20) + 512, seed: 73)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "copy-fails", inStore: "file1")["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess.rbd(["glance": ["copy_to_store": web, "copy_timeout": "120"]])
        defer { a.stop() }
        let (status, o) = try a.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201, "\(disk) \(a.log().suffix(2000))")
        #expect(disk["method"] as? String == "base-built", "\(disk)")
        #expect((disk["fallback"] as? String ?? "").contains("os_glance_failed_import"), "\(disk)")
        #expect((disk["seconds"] as? Double ?? 999) < 60, "\(disk)")
        #expect(try exported(disk) == Data(bytes))
        _ = try a.request("DELETE", "/v1/disks/\(disk["name"] as? String ?? "")")
        _ = try a.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    /// A copy slower than `copy_timeout` (1 s for a 96 MiB image Glance reads from the gateway and writes to
    /// ceph1): the disk is built from the shared base, its JSON says the copy timed out, and once Glance's copy
    /// lands, the next instance is a clone of it.
    @Test func aCopySlowerThanTheTimeoutFallsBackAndTheNextDiskClonesIt() async throws {
        let rbd = try #require(OpenStack.rbdStore), s3 = try #require(OpenStack.s3Store)
        let bytes = OpenStack.testBytes(96 << 20, seed: 74)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "copy-slow", inStore: s3)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess.rbd(["glance": ["copy_to_store": rbd, "copy_timeout": "1"]])
        defer { a.stop() }
        let (status, o) = try a.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201, "\(disk) \(a.log().suffix(2000))")
        #expect(disk["method"] as? String == "base-built", "\(disk)")
        #expect((disk["fallback"] as? String ?? "").contains("copy_timeout (1 s)"), "\(disk)")
        #expect(importRequests(id) == 1)
        #expect(try exported(disk) == Data(bytes))

        // Glance goes on copying; once the image is in ceph1 the next disk is a clone of Glance's copy.
        var stores: Set<String> = []
        for _ in 0..<240 {
            let (_, shown) = try await OpenStack.glance("GET", "/v2/images/\(id)")
            let image = shown as? [String: Any] ?? [:]
            stores = Set((image["stores"] as? String ?? "").split(separator: ",").map(String.init))
            if stores.contains(rbd) && (image["os_glance_importing_to_stores"] as? String ?? "").isEmpty { break }
            try await Task.sleep(for: .milliseconds(500))
        }
        #expect(stores == [s3, rbd])
        let (status2, o2) = try a.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
        let second = o2 as? [String: Any] ?? [:]
        #expect(status2 == 201, "\(second)")
        #expect(second["method"] as? String == "glance-clone", "\(second)")
        #expect(second["parent"] as? String == "images/\(id)@snap", "\(second)")
        #expect(try exported(second) == Data(bytes))
        for d in [disk, second] { _ = try a.request("DELETE", "/v1/disks/\(d["name"] as? String ?? "")") }
        _ = try a.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    /// Most clouds hide locations (show_image_direct_url and show_multiple_locations off, the fixture's second
    /// Glance API). A raw image in ceph1 then shows none; only the service role (and, in Glance 33, still admin)
    /// reads them, through `GET /v2/images/{id}/locations`. An agent whose user has it clones Glance's snapshot;
    /// one whose user is a plain member builds the base and says why in the disk's JSON. copy-to-store works
    /// behind such a Glance too.
    @Test func hiddenLocationsAreReadWithTheServiceRole() async throws {
        let rbd = try #require(OpenStack.rbdStore)
        let glance = try #require(OpenStack.privateGlanceURL), service = try #require(OpenStack.serviceUser)
        let bytes = OpenStack.testBytes((4 << 20) + 512, seed: 79)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "hidden-locations",
                                                 properties: ["visibility": "public"], store: rbd)["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }

        // What each user sees on the API that hides locations.
        let member = try await OpenStack.token(user: "demo", password: "demopw", project: "demo")
        let serviceToken = try await OpenStack.token(user: service.name, password: service.password, project: service.project)
        let (_, shown) = try await OpenStack.get(glance, "/v2/images/\(id)", token: serviceToken)
        let image = shown as? [String: Any] ?? [:]
        #expect(image["stores"] as? String == rbd && image["locations"] == nil && image["direct_url"] == nil, "\(image)")
        #expect(try await OpenStack.get(glance, "/v2/images/\(id)/locations", token: member).0 == 403)
        let (listed, locations) = try await OpenStack.get(glance, "/v2/images/\(id)/locations", token: serviceToken)
        #expect(listed == 200 && "\(locations ?? "")".contains("rbd://"), "\(locations ?? "")")

        let asMember = try AgentProcess.rbd(["glance": ["api_servers": glance, "username": "demo", "password": "demopw",
                                                        "project_name": "demo"]])
        defer { asMember.stop() }
        let (s1, o1) = try asMember.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
        let based = o1 as? [String: Any] ?? [:]
        #expect(s1 == 201 && based["method"] as? String == "base-built", "\(based) \(asMember.log().suffix(2000))")
        #expect((based["fallback"] as? String ?? "").contains("service role"), "\(based)")

        let asService = try AgentProcess.rbd(["glance": ["api_servers": glance, "username": service.name,
                                                         "password": service.password, "project_name": service.project]])
        defer { asService.stop() }
        let (s2, o2) = try asService.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), id), timeout: 300)
        let cloned = o2 as? [String: Any] ?? [:]
        #expect(s2 == 201 && cloned["method"] as? String == "glance-clone", "\(cloned) \(asService.log().suffix(2000))")
        #expect(cloned["parent"] as? String == "images/\(id)@snap", "\(cloned)")
        for d in [based, cloned] { #expect(try exported(d) == Data(bytes)) }

        // copy-to-store behind the hiding API: the copy's location is read the same way.
        let other = try await OpenStack.createImage(OpenStack.testBytes((3 << 20) + 512, seed: 80), diskFormat: "raw",
                                                    name: "hidden-copy", inStore: "file1")["id"] as! String
        defer { Task { await OpenStack.deleteImage(other) } }
        let copier = try AgentProcess.rbd(["glance": ["api_servers": glance, "username": service.name, "password": service.password,
                                                      "project_name": service.project, "copy_to_store": rbd]])
        defer { copier.stop() }
        let (s3, o3) = try copier.request("POST", "/v1/disks", json: diskBody(UUID().uuidString.lowercased(), other), timeout: 300)
        let copied = o3 as? [String: Any] ?? [:]
        #expect(s3 == 201 && copied["method"] as? String == "copy-to-store", "\(copied) \(copier.log().suffix(2000))")
        #expect(copied["parent"] as? String == "images/\(other)@snap", "\(copied)")

        _ = try asMember.request("DELETE", "/v1/disks/\(based["name"] as? String ?? "")")
        _ = try asService.request("DELETE", "/v1/disks/\(cloned["name"] as? String ?? "")")
        _ = try copier.request("DELETE", "/v1/disks/\(copied["name"] as? String ?? "")")
        _ = try asMember.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }
}
