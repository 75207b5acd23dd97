import CephFixture
import Foundation
import OpenStackFixture
import Testing

/// Glance's cinder stores on the real Cinder fixture (scripts/cinder-fixture.sh): `cinder-fast` and `cinder-slow`,
/// bound to the volume types `glance-fast` and `glance-slow`, whose RBD back ends keep the volumes in
/// `volumes-fast` and `volumes-slow` of the test cluster. The agent downloads from them through Glance like from
/// any store, and makes boot disks from the image's volume inside the cluster (`cinder-clone`).
@Suite("Glance cinder stores", .enabled(if: OpenStack.available && Ceph.available && !OpenStack.cinderStores.isEmpty), .serialized)
struct CinderStoreTests {
    static func seed(_ s: String) -> UInt64 { s.utf8.reduce(0) { $0 &* 31 &+ UInt64($1) } }

    func exported(_ location: String) throws -> Data? {
        let path = NSTemporaryDirectory() + "cinder-\(UUID().uuidString.prefix(8)).raw"
        try Ceph.export(location, to: path)
        defer { try? FileManager.default.removeItem(atPath: path) }
        return FileManager.default.contents(atPath: path)
    }

    func rbdImages(_ pool: String) throws -> [String] {
        String(decoding: try Ceph.rbd(["ls", pool]), as: UTF8.self).split(separator: "\n").map(String.init)
    }

    /// Waits until Cinder has deleted the volume (Glance answers the image DELETE before it is gone).
    func waitVolumeGone(_ volume: String) async throws -> Bool {
        for _ in 0..<300 {
            if try await OpenStack.cinder("/volumes/\(volume)").0 == 404 { return true }
            try await Task.sleep(for: .milliseconds(100))
        }
        return false
    }

    /// An image uploaded to each cinder store is a volume of the store's type, and the agent fetches and verifies
    /// it into its cache through Glance (which attaches the volume with os-brick's RBD connector).
    @Test(arguments: ["cinder-fast", "cinder-slow"])
    func fetchFromEachCinderStore(store: String) async throws {
        let bytes = OpenStack.testBytes((3 << 20) + 1024, seed: Self.seed(store))
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "cinder-fetch-\(store)", inStore: store)
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        #expect(image["stores"] as? String == store, "\(image)")
        let volume = try #require(OpenStack.cinderVolume(ofImage: image), "\(image)")
        let (status, v) = try await OpenStack.cinder("/volumes/\(volume)")
        let shown = (v as? [String: Any])?["volume"] as? [String: Any] ?? [:]
        #expect(status == 200 && shown["volume_type"] as? String == "glance-\(store.dropFirst(7))", "\(shown)")
        #expect(try rbdImages(OpenStack.cinderPools[store]!).contains("volume-\(volume)"))

        let agent = try AgentProcess()
        try agent.start()
        defer { agent.stop() }
        #expect([200, 202].contains(try agent.request("PUT", "/v1/images/\(id)").0))
        let fetched = try await agent.waitForImage(id)
        #expect(fetched["state"] as? String == "ready", "\(fetched) \(agent.log().suffix(2000))")
        #expect(fetched["os_hash_value"] as? String == sha512Hex(bytes))
        #expect(FileManager.default.contents(atPath: fetched["path"] as? String ?? "") == Data(bytes))
        #expect(fetched["stores"] as? [String] == [store], "\(fetched)")
    }

    /// A raw image in each cinder store: the first disk is a clone of a base copied from the image's volume inside
    /// the cluster (Glance never serves the data), the second a clone of the same base. Deleting the Glance image
    /// deletes its volume while the disks exist (the volume was only read: no snapshot pins it), the disks keep
    /// their bytes, and once they and the base are gone no pool holds anything of the image.
    @Test(arguments: ["cinder-fast", "cinder-slow"])
    func cinderCloneFromEachStore(store: String) async throws {
        let bytes = OpenStack.testBytes((5 << 20) + 512, seed: Self.seed(store) &+ 1)
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "cinder-clone-\(store)", inStore: store)
        let id = image["id"] as! String
        var deleted = false
        defer { if !deleted { Task { await OpenStack.deleteImage(id) } } }
        let volume = try #require(OpenStack.cinderVolume(ofImage: image), "\(image)")
        let agent = try AgentProcess.rbd()
        defer { agent.stop() }

        let first = UUID().uuidString.lowercased(), second = UUID().uuidString.lowercased()
        let (s1, o1) = try agent.request("POST", "/v1/disks", json: diskBody(first, id), timeout: 300)
        let d1 = o1 as? [String: Any] ?? [:]
        #expect(s1 == 201, "\(d1) \(agent.log().suffix(2000))")
        #expect(d1["method"] as? String == "cinder-clone", "\(d1) \(agent.log().suffix(2000))")
        #expect(d1["parent"] as? String == "vms/imgconv-base-\(id)@imgconv", "\(d1)")
        #expect(d1["fallback"] == nil, "\(d1)")
        #expect(OpenStack.fileRequests(id) == 0, "Glance served the image's data")
        #expect(try exported("vms/\(first)_disk") == Data(bytes))

        let (s2, o2) = try agent.request("POST", "/v1/disks", json: diskBody(second, id), timeout: 300)
        let d2 = o2 as? [String: Any] ?? [:]
        #expect(s2 == 201, "\(d2)")
        #expect(d2["method"] as? String == "base-reused", "\(d2)")
        #expect(d2["parent"] as? String == d1["parent"] as? String, "\(d2)")
        #expect(d2["bytes_written"] as? Int == 0, "\(d2)")
        let metrics = try shell(["curl", "-s", "--unix-socket", agent.socket, "http://agent/metrics"]).out
        #expect(metrics.contains("imgconv_disks_total{kind=\"cinder_bases\"} 1"), "\(metrics)")

        // The Glance image and its volume go while both disks exist.
        #expect(try await OpenStack.glance("DELETE", "/v2/images/\(id)").0 == 204)
        deleted = true
        #expect(try await waitVolumeGone(volume), "Cinder did not delete volume \(volume)")
        #expect(try !rbdImages(OpenStack.cinderPools[store]!).contains("volume-\(volume)"))
        #expect(try exported("vms/\(second)_disk") == Data(bytes))

        for d in [first, second] { #expect(try agent.request("DELETE", "/v1/disks/\(d)_disk").0 == 204) }
        let (_, gc) = try agent.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
        #expect((gc as? [String: Any])?["removed"] as? [String] == ["imgconv-base-\(id)"], "\(String(describing: gc))")
        for pool in ["vms"] + OpenStack.cinderPools.values.sorted() {
            let left = try rbdImages(pool).filter { $0.contains(id) || $0.contains(volume) || $0.hasPrefix(first) || $0.hasPrefix(second) }
            #expect(left.isEmpty, "\(pool): \(left)")
        }
    }

    /// A qcow2 image in a cinder store: converted from the volume through librbd into the shared base.
    @Test func aQcow2InACinderStoreIsConvertedFromItsVolume() async throws {
        let qcow2 = try [UInt8](Data(contentsOf: URL(fileURLWithPath: OpenStack.repository + "/samples/qcow2-zlib.qcow2")))
        let raw = try Data(contentsOf: URL(fileURLWithPath: OpenStack.repository + "/samples/base.raw"))
        let image = try await OpenStack.createImage(qcow2, diskFormat: "qcow2", name: "cinder-qcow2", inStore: "cinder-slow")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let agent = try AgentProcess.rbd()
        defer { agent.stop() }
        let instance = UUID().uuidString.lowercased()
        let (status, o) = try agent.request("POST", "/v1/disks", json: diskBody(instance, id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201, "\(disk) \(agent.log().suffix(2000))")
        #expect(disk["method"] as? String == "cinder-convert", "\(disk)")
        #expect(OpenStack.fileRequests(id) == 0)
        #expect(try exported("vms/\(instance)_disk") == raw)
        _ = try agent.request("DELETE", "/v1/disks/\(instance)_disk")
        _ = try agent.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    /// Writes `bytes` at the start of an RBD image as the cluster's admin (Debian's python3-rbd).
    func overwrite(_ spec: String, with bytes: Data) throws {
        let file = NSTemporaryDirectory() + "cinder-tamper-\(UUID().uuidString.prefix(8))"
        try bytes.write(to: URL(fileURLWithPath: file))
        defer { try? FileManager.default.removeItem(atPath: file) }
        let parts = spec.split(separator: "/").map(String.init)
        let script = """
        import rados, rbd, sys
        c = rados.Rados(conffile=sys.argv[1], name='client.admin', conf={'keyring': sys.argv[2]})
        c.connect()
        io = c.open_ioctx(sys.argv[3])
        with rbd.Image(io, sys.argv[4]) as img:
            img.write(open(sys.argv[5], 'rb').read(), 0)
        io.close()
        c.shutdown()
        """
        let r = try shell(["/usr/bin/python3", "-c", script, Ceph.confPath, Ceph.env["CEPH_ADMIN_KEYRING"]!, parts[0], parts[1], file])
        guard r.status == 0 else { throw OpenStack.FixtureError("overwrite \(spec): \(r.err)") }
    }

    /// Someone with access to the volume pool replaced the image's first bytes with a qcow2 header whose backing
    /// file is a host path. The agent hashes the volume before anything is published: the disk is refused (502)
    /// and nothing is left behind. With `verify_hash = false` the inspection still refuses it (422): Glance says
    /// raw, the bytes are a qcow2 with a backing file.
    @Test(arguments: [true, false])
    func aTamperedVolumeIsRefused(verifyHash: Bool) async throws {
        let bytes = OpenStack.testBytes((2 << 20) + 512, seed: verifyHash ? 93 : 94)
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "cinder-tampered", inStore: "cinder-fast")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let volume = try #require(OpenStack.cinderVolume(ofImage: image))
        let hostile = NSTemporaryDirectory() + "cinder-hostile-\(id.prefix(8)).qcow2"
        defer { try? FileManager.default.removeItem(atPath: hostile) }
        let made = try shell(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", hostile, "2M"])
        try #require(made.status == 0, "\(made.err)")
        try overwrite("\(OpenStack.cinderPools["cinder-fast"]!)/volume-\(volume)", with: try Data(contentsOf: URL(fileURLWithPath: hostile)))

        let agent = try AgentProcess.rbd(["glance": ["verify_hash": verifyHash ? "true" : "false"]])
        defer { agent.stop() }
        let instance = UUID().uuidString.lowercased()
        let (status, o) = try agent.request("POST", "/v1/disks", json: diskBody(instance, id), timeout: 300)
        let error = ((o as? [String: Any])?["error"] as? [String: Any]) ?? [:]
        if verifyHash {
            #expect(status == 502 && error["type"] as? String == "upstream_error", "\(status) \(error)")
            #expect((error["message"] as? String ?? "").contains("sha512"), "\(error)")
        } else {
            #expect(status == 422 && error["type"] as? String == "unsafe_image", "\(status) \(error)")
            #expect((error["message"] as? String ?? "").contains("qcow2"), "\(error)")
        }
        #expect(OpenStack.fileRequests(id) == 0)
        let left = try rbdImages("vms").filter { $0.contains(id) || $0.hasPrefix(instance) }
        #expect(left.isEmpty, "\(left)")
    }

    /// A Glance that hides locations (most clouds): the agent's service user reads the `cinder://` location with
    /// `GET /v2/images/{id}/locations`, and Cinder shows that admin user the volume's back end.
    @Test func hiddenCinderLocationsAreReadWithTheServiceRole() async throws {
        let glance = try #require(OpenStack.privateGlanceURL), service = try #require(OpenStack.serviceUser)
        let bytes = OpenStack.testBytes((2 << 20) + 512, seed: 95)
        let id = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "cinder-hidden", inStore: "cinder-slow")["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let token = try await OpenStack.token(user: service.name, password: service.password, project: service.project)
        let (_, shown) = try await OpenStack.get(glance, "/v2/images/\(id)", token: token)
        #expect((shown as? [String: Any])?["locations"] == nil, "\(String(describing: shown))")
        let agent = try AgentProcess.rbd(["glance": ["api_servers": glance, "username": service.name, "password": service.password,
                                                     "project_name": service.project]])
        defer { agent.stop() }
        let instance = UUID().uuidString.lowercased()
        let (status, o) = try agent.request("POST", "/v1/disks", json: diskBody(instance, id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201 && disk["method"] as? String == "cinder-clone", "\(disk) \(agent.log().suffix(2000))")
        #expect(try exported("vms/\(instance)_disk") == Data(bytes))
        _ = try agent.request("DELETE", "/v1/disks/\(instance)_disk")
        _ = try agent.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    /// With the Cinder API unreachable the agent downloads through Glance instead, and the disk says why; with the
    /// store's pool named in `[cinder_stores]` it needs no API at all.
    @Test(arguments: [false, true])
    func anUnreachableCinderAPI(storesConfigured: Bool) async throws {
        let bytes = OpenStack.testBytes((2 << 20) + 512, seed: storesConfigured ? 91 : 92)
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "cinder-unreachable", inStore: "cinder-fast")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        var extra: [String: [String: String]] = ["cinder": ["endpoint_override": "http://127.0.0.1:9/v3/nowhere", "timeout": "5"]]
        if storesConfigured { extra["cinder_stores"] = ["cinder-fast": OpenStack.cinderPools["cinder-fast"]!] }
        let agent = try AgentProcess.rbd(extra)
        defer { agent.stop() }
        let instance = UUID().uuidString.lowercased()
        let (status, o) = try agent.request("POST", "/v1/disks", json: diskBody(instance, id), timeout: 300)
        let disk = o as? [String: Any] ?? [:]
        #expect(status == 201, "\(disk) \(agent.log().suffix(2000))")
        if storesConfigured {
            #expect(disk["method"] as? String == "cinder-clone", "\(disk)")
            #expect(OpenStack.fileRequests(id) == 0)
        } else {
            #expect(disk["method"] as? String == "base-built", "\(disk)")
            #expect((disk["fallback"] as? String ?? "").contains("the Cinder API did not answer"), "\(disk)")
            #expect(OpenStack.fileRequests(id) == 1)
        }
        #expect(try exported("vms/\(instance)_disk") == Data(bytes))
        _ = try agent.request("DELETE", "/v1/disks/\(instance)_disk")
        _ = try agent.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }
}
