import CephFixture
import Foundation
import OpenStackFixture
import RBD
import Synchronization
import Testing

/// `POST /v1/disks` on real agent processes: three agents racing for one base on the real Ceph cluster, a
/// builder killed with SIGKILL mid-import, Ceph unreachable, and the local qcow2-overlay backend.
@Suite("agent disks", .enabled(if: OpenStack.available && Ceph.available), .serialized)
struct AgentDiskTests {
    func rbdAgent(lease: String = "30", confPath: String = Ceph.confPath, timeout: String = "10") throws -> AgentProcess {
        try AgentProcess.rbd(["rbd": ["ceph_conf": confPath, "connect_timeout": timeout]], lease: lease)
    }

    /// A qcow2 of `mib` MiB of mixed data (the oracle makes it), and its raw form.
    func qcow2Image(mib: Int, seed: UInt64, dir: String) throws -> (qcow2: [UInt8], raw: Data) {
        let raw = Data(OpenStack.testBytes(mib << 20, seed: seed))
        try raw.write(to: URL(fileURLWithPath: dir + "/src.raw"))
        let r = try shell(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", dir + "/src.raw", dir + "/src.qcow2"])
        #expect(r.status == 0, "\(r.err)")
        return ([UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/src.qcow2"))), raw)
    }

    func body(_ instance: String, _ image: String) -> String { diskBody(instance, image) }

    func exported(_ spec: String, _ dir: String) throws -> Data {
        try Ceph.export(spec, to: dir + "/export.raw")
        return try Data(contentsOf: URL(fileURLWithPath: dir + "/export.raw"))
    }

    let vms = Result { try RadosCluster(Ceph.user).ioContext(pool: "vms") }

    func rbdImages() throws -> [String] { try vms.get().listImages() }

    @Test func threeAgentsOneImport() async throws {
        let dir = NSTemporaryDirectory() + "imgconv-3agents-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (qcow2, raw) = try qcow2Image(mib: 24, seed: 21, dir: dir)
        let image = try await OpenStack.createImage(qcow2, diskFormat: "qcow2", name: "agent-disks-3")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let agents = try (0..<3).map { _ in try rbdAgent() }
        defer { for a in agents { a.stop() } }

        let answers = try await fleetCreates(agents, id)   // every one a 201
        let methods = answers.map { $0["method"] as? String ?? "" }
        #expect(methods.filter { $0 == "base-built" }.count == 1, "\(methods)")
        #expect(methods.filter { $0 == "base-reused" }.count == 2, "\(methods)")
        // Only the builder downloaded: one GET of the data for three instances on three nodes.
        #expect(OpenStack.fileRequests(id) == 1)
        for o in answers { #expect(try exported(o["location"] as! String, dir) == raw) }

        let metrics = try shell(["curl", "-s", "--unix-socket", agents[0].socket, "http://agent/metrics"]).out
            + (try shell(["curl", "-s", "--unix-socket", agents[1].socket, "http://agent/metrics"]).out)
            + (try shell(["curl", "-s", "--unix-socket", agents[2].socket, "http://agent/metrics"]).out)
        #expect(metrics.components(separatedBy: "imgconv_disks_total{kind=\"bases_built\"} 1").count == 2, "\(metrics)")
        let (ls, listed) = try agents[1].request("GET", "/v1/disks")
        #expect(ls == 200)
        let names = ((listed as? [String: Any])?["disks"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        for o in answers { #expect(names.contains(o["name"] as! String)) }
        for o in answers { #expect(try agents[2].request("DELETE", "/v1/disks/\(o["name"] as! String)").0 == 204) }
        // Each test names its own image, so no other test's GC (they share the pool) takes this base's lease.
        let (gc, removed) = try agents[0].request("POST", "/v1/bases/gc?idle=0&image=\(id)")
        #expect(gc == 200)
        #expect((removed as? [String: Any])?["removed"] as? [String] == ["imgconv-base-\(id)"])
        #expect(try !rbdImages().contains("imgconv-base-\(id)"))
    }

    /// Disks for one image from `n` agents at once: one answer per agent, every one a 201.
    func fleetCreates(_ agents: [AgentProcess], _ id: String) async throws -> [[String: Any]] {
        let raws = try await withThrowingTaskGroup(of: (Int, Data).self) { g in
            for a in agents {
                let call = onThread {
                    let (s, o) = try a.request("POST", "/v1/disks", json: self.body(UUID().uuidString.lowercased(), id), timeout: 600)
                    return (s, (try? JSONSerialization.data(withJSONObject: o ?? [:])) ?? Data())
                }
                g.addTask { try await call.value }
            }
            return try await g.reduce(into: [(Int, Data)]()) { $0.append($1) }
        }
        #expect(raws.allSatisfy { $0.0 == 201 }, "\(raws.map { String(decoding: $0.1, as: UTF8.self) })")
        return raws.map { (try? JSONSerialization.jsonObject(with: $0.1)) as? [String: Any] ?? [:] }
    }

    /// A fleet of compute nodes (IMGCONV_FLEET_N agent processes, 8 by default; bench/fleet.sh runs more) asked
    /// at the same moment for a disk of a qcow2 image none has: exactly one base is built, Glance serves the
    /// image once, every disk reads the image's bytes, no agent logs an error. Then a second image, while the
    /// first one's base is being collected.
    @Test func aFleetOfAgentsMakesOneBaseFromOneGlanceRead() async throws {
        let n = Int(ProcessInfo.processInfo.environment["IMGCONV_FLEET_N"] ?? "") ?? 8
        let dir = NSTemporaryDirectory() + "imgconv-fleet-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (qcow2, raw) = try qcow2Image(mib: 24, seed: 23, dir: dir)
        let first = try await OpenStack.createImage(qcow2, diskFormat: "qcow2", name: "fleet-1")["id"] as! String
        let (qcow2b, rawb) = try qcow2Image(mib: 16, seed: 24, dir: dir)
        let second = try await OpenStack.createImage(qcow2b, diskFormat: "qcow2", name: "fleet-2")["id"] as! String
        defer { Task { await OpenStack.deleteImage(first); await OpenStack.deleteImage(second) } }
        let agents = try (0..<n).map { _ in try rbdAgent() }
        defer { for a in agents { a.stop() } }

        let disks = try await fleetCreates(agents, first)
        let methods = disks.map { $0["method"] as? String ?? "" }
        #expect(methods.filter { $0 == "base-built" }.count == 1, "\(methods)")
        #expect(methods.filter { $0 == "base-reused" }.count == n - 1, "\(methods)")
        #expect(Set(disks.compactMap { $0["parent"] as? String }) == ["vms/imgconv-base-\(first)@imgconv"])
        #expect(OpenStack.fileRequests(first) == 1, "Glance served the image more than once")
        for d in disks.prefix(3) { #expect(try exported(d["location"] as! String, dir) == raw) }

        // The first image's disks go; its base is collected while the fleet builds the second image.
        for (a, d) in zip(agents, disks) { #expect(try a.request("DELETE", "/v1/disks/\(d["name"] as! String)").0 == 204) }
        let gc = onThread { () -> (Int, [String]) in
            let (s, o) = try agents[0].request("POST", "/v1/bases/gc?idle=0&image=\(first)")
            return (s, (o as? [String: Any])?["removed"] as? [String] ?? [])
        }
        let more = try await fleetCreates(agents, second)
        let (gcStatus, removed) = try await gc.value
        #expect(gcStatus == 200 && removed == ["imgconv-base-\(first)"], "\(removed)")
        #expect(more.map { $0["method"] as? String ?? "" }.filter { $0 == "base-built" }.count == 1)
        #expect(OpenStack.fileRequests(second) == 1)
        #expect(try exported(more[0]["location"] as! String, dir) == rawb)

        for a in agents {
            let errors = a.log().split(separator: "\n").filter { $0.contains("+0000 error ") || $0.contains("+0000 critical ") }
            #expect(errors.isEmpty, "\(errors)")
        }
        for (a, d) in zip(agents, more) { _ = try a.request("DELETE", "/v1/disks/\(d["name"] as! String)") }
        _ = try agents[0].request("POST", "/v1/bases/gc?idle=0&image=\(second)")
    }

    @Test func killedImporterIsTakenOver() async throws {
        let dir = NSTemporaryDirectory() + "imgconv-kill-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (qcow2, raw) = try qcow2Image(mib: 384, seed: 22, dir: dir)
        let image = try await OpenStack.createImage(qcow2, diskFormat: "qcow2", name: "agent-disks-kill")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try rbdAgent(lease: "4")
        let b = try rbdAgent(lease: "4")
        defer { a.stop(); b.stop() }

        let request = body(UUID().uuidString.lowercased(), id)
        // Kill the builder as soon as its half-written base is in the pool. The whole build of this image takes
        // under 2 s, so the watch runs on its own thread, polling every 5 ms and killing from there: a task on
        // the shared pool can be held off for longer than that while other suites run.
        let io = try vms.get()
        let found = Mutex<String?>(nil)
        let watcher = Thread {
            let deadline = Date().addingTimeInterval(120)
            while Date() < deadline {
                if let p = (try? io.listImages())?.first(where: { $0.hasPrefix("imgconv-base-\(id).part-") }) {
                    a.kill9()
                    found.withLock { $0 = p }
                    return
                }
                usleep(5000)
            }
        }
        watcher.start()
        let first = onThread { _ = try? a.request("POST", "/v1/disks", json: request, timeout: 300) }
        while !watcher.isFinished { try await Task.sleep(nanoseconds: 10_000_000) }
        a.kill9()
        _ = await first.result
        let half = try #require(found.withLock { $0 }, "the builder never started writing its base: \(a.log().suffix(3000))")
        #expect(try !rbdImages().contains("imgconv-base-\(id)"), "the killed builder finished before it was killed")

        let started = Date()
        let (s, o) = try b.request("POST", "/v1/disks", json: body(UUID().uuidString.lowercased(), id), timeout: 300)
        #expect(s == 201, "\(String(describing: o)) \(b.log().suffix(2000))")
        let info = o as? [String: Any] ?? [:]
        #expect(info["method"] as? String == "base-built")
        #expect(Date().timeIntervalSince(started) < 120)
        #expect(try exported(info["location"] as! String, dir) == raw)
        // The dead builder's part is never cloned; Ceph keeps it busy until the dead client's watch times out
        // (osd_client_watch_timeout: 5 s on the test cluster, 30 s by default), then GC removes it.
        #expect(info["parent"] as? String == "vms/imgconv-base-\(id)@imgconv")
        let gcDeadline = Date().addingTimeInterval(60)
        while try rbdImages().contains(half) && Date() < gcDeadline {
            _ = try b.request("POST", "/v1/bases/gc?idle=3600&image=\(id)")
            try await Task.sleep(nanoseconds: 500_000_000)
        }
        #expect(try !rbdImages().contains(half), "the dead builder's part was never removed: \(b.log().suffix(3000))")
        #expect(try rbdImages().contains("imgconv-base-\(id)"), "GC removed a base that has a child")
        #expect(try b.request("DELETE", "/v1/disks/\(info["name"] as! String)").0 == 204)
        _ = try b.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
    }

    @Test func cephUnreachableIsAClearErrorWithinTheTimeout() async throws {
        let dir = NSTemporaryDirectory() + "imgconv-deadceph-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let conf = try String(contentsOfFile: Ceph.confPath, encoding: .utf8)
            .replacingOccurrences(of: #"mon host = .*"#, with: "mon host = 127.0.0.1:1", options: .regularExpression)
        try conf.write(toFile: dir + "/ceph.conf", atomically: true, encoding: .utf8)
        let image = try await OpenStack.createImage(OpenStack.testBytes(1 << 20, seed: 23), diskFormat: "raw", name: "agent-disks-dead")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try rbdAgent(confPath: dir + "/ceph.conf", timeout: "3")
        defer { a.stop() }
        let started = Date()
        let (s, o) = try a.request("POST", "/v1/disks", json: body(UUID().uuidString.lowercased(), id))
        let took = Date().timeIntervalSince(started)
        #expect(s == 504 || s == 502, "\(s) \(String(describing: o))")
        let message = ((o as? [String: Any])?["error"] as? [String: Any])?["message"] as? String ?? ""
        #expect(message.contains("rados_connect"), "\(message)")
        #expect(took < 20, "took \(took) s with connect_timeout = 3 (without it librados waits minutes)")
        #expect(try a.request("GET", "/v1/health").0 == 200)
    }

    @Test func localBackendMakesAQcow2OverlayOnARawBase() async throws {
        let dir = NSTemporaryDirectory() + "imgconv-local-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (qcow2, raw) = try qcow2Image(mib: 8, seed: 24, dir: dir)
        try raw.write(to: URL(fileURLWithPath: dir + "/expected.raw"))
        let image = try await OpenStack.createImage(qcow2, diskFormat: "qcow2", name: "agent-disks-local")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess()
        try a.start()
        defer { a.stop() }
        let instance = UUID().uuidString.lowercased()
        let (s, o) = try a.request("POST", "/v1/disks", json: #"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "size": 16777216}"#)
        #expect(s == 201, "\(String(describing: o)) \(a.log().suffix(1500))")
        let info = o as? [String: Any] ?? [:]
        #expect(info["backend"] as? String == "local")
        let path = try #require(info["location"] as? String)
        #expect(path == a.dir + "/state/instances/\(instance)/disk")
        let qinfo = try shell(["qemu-img", "info", "--output", "json", path])
        let q = try JSONSerialization.jsonObject(with: Data(qinfo.out.utf8)) as? [String: Any] ?? [:]
        #expect(q["format"] as? String == "qcow2")
        #expect(q["virtual-size"] as? Int == 16 << 20)
        #expect(q["backing-filename"] as? String == a.dir + "/state/instances/_base/\(id)")
        #expect(q["backing-filename-format"] as? String == "raw")
        #expect(try shell(["qemu-img", "check", path]).status == 0)
        // The guest sees the image, then zeros up to the flavor's size.
        let cmp = try shell(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, dir + "/expected.raw"])
        #expect(cmp.status == 0, "\(cmp.out) \(cmp.err)")
        #expect(try a.request("POST", "/v1/disks", json: #"{"instance_uuid": "\#(instance)", "image_id": "\#(id)"}"#).0 == 409)
        // The base stays while a disk uses it; once none does, GC removes it.
        let (_, kept) = try a.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
        #expect(((kept as? [String: Any])?["removed"] as? [String])?.isEmpty == true)
        #expect(try a.request("DELETE", "/v1/disks/\(instance)_disk").0 == 204)
        #expect(!FileManager.default.fileExists(atPath: path))
        let (_, removed) = try a.request("POST", "/v1/bases/gc?idle=0&image=\(id)")
        #expect((removed as? [String: Any])?["removed"] as? [String] == [id])
        #expect(!FileManager.default.fileExists(atPath: a.dir + "/state/instances/_base/\(id)"))
    }

    /// `imgconv disk create|ls|flatten|rm` against a running agent, as an operator types them.
    @Test func diskCommands() async throws {
        let image = try await OpenStack.createImage(try [UInt8](Data(contentsOf: URL(fileURLWithPath: OpenStack.repository + "/samples/vdi-dynamic.vdi"))),
                                                    diskFormat: "vdi", name: "agent-disks-cli")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try rbdAgent()
        defer { a.stop() }
        let instance = UUID().uuidString.lowercased()
        let create = try shell([imgconvBinary, "disk", "create", "--socket", a.socket, "--size", "8M", instance, id])
        #expect(create.status == 0, "\(create.err)")
        let info = try JSONSerialization.jsonObject(with: Data(create.out.utf8)) as? [String: Any] ?? [:]
        #expect(info["name"] as? String == "\(instance)_disk" && info["size"] as? Int == 8 << 20)
        let ls = try shell([imgconvBinary, "disk", "ls", "--socket", a.socket])
        #expect(ls.status == 0 && ls.out.contains("\(instance)_disk") && ls.out.contains("vms/imgconv-base-\(id)@imgconv"), "\(ls.out)")
        let flat = try shell([imgconvBinary, "disk", "flatten", "--socket", a.socket, "\(instance)_disk"])
        #expect(flat.status == 0)
        #expect((try JSONSerialization.jsonObject(with: Data(flat.out.utf8)) as? [String: Any])?["parent"] == nil)
        #expect(try shell([imgconvBinary, "disk", "rm", "--socket", a.socket, "\(instance)_disk"]).status == 0)
        let gone = try shell([imgconvBinary, "disk", "rm", "--socket", a.socket, "\(instance)_disk"])
        #expect(gone.status != 0 && gone.err.contains("does not exist"), "\(gone.err)")
        let bad = try shell([imgconvBinary, "disk", "create", "--socket", a.socket, "--size", "1k", UUID().uuidString, id])
        #expect(bad.status != 0 && bad.err.contains("smaller than the image's virtual size"), "\(bad.err)")
        // Another image's base is not looked at; this one's is removed.
        let other = try shell([imgconvBinary, "disk", "gc", "--socket", a.socket, "--idle", "0", UUID().uuidString.lowercased()])
        #expect(other.status == 0 && !other.out.contains("imgconv-base-\(id)"), "\(other.out)")
        let gc = try shell([imgconvBinary, "disk", "gc", "--socket", a.socket, "--idle", "0", id])
        #expect(gc.status == 0 && gc.out.contains("imgconv-base-\(id)"), "\(gc.out)")
    }
}
