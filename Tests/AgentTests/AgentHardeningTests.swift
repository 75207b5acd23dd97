import Foundation
import OpenStackFixture
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The agent as a root daemon on a hypervisor: no request, peer or setting crashes it, holds its descriptors or
/// makes it touch what it did not make.
@Suite("agent hardening", .enabled(if: OpenStack.available), .serialized)
struct AgentHardeningTests {
    func message(_ o: Any?) -> String { ((o as? [String: Any])?["error"] as? [String: Any])?["message"] as? String ?? "\(String(describing: o))" }

    /// Every input is bounded and checked before work starts: a clear 4xx naming what is wrong, and the agent
    /// lives. The size that used to kill it (a 2^62-byte qcow2 overlay) is over [disks] max_size.
    @Test func requestsAreBoundedAndTyped() async throws {
        let image = try await OpenStack.createImage(OpenStack.testBytes(1 << 20, seed: 41), diskFormat: "raw", name: "hardening-bounds")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess()
        try a.start()
        defer { a.stop() }
        let instance = UUID().uuidString.lowercased()
        func post(_ body: String, query: String = "") throws -> (Int, Any?) { try a.request("POST", "/v1/disks" + query, json: body) }

        let (huge, hugeBody) = try post(#"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "size": 4611686018427387904}"#)
        #expect(huge == 400 && message(hugeBody).contains("max_size"), "\(huge) \(message(hugeBody))")
        #expect(try a.request("GET", "/v1/health").0 == 200, "the agent died: \(a.log().suffix(2000))")
        for (body, field) in [(#"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "size": 1.5}"#, "size"),
                              (#"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "size": "1G"}"#, "size"),
                              (#"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "size": -1}"#, "size"),
                              (#"{"instance_uuid": 5, "image_id": "\#(id)"}"#, "instance_uuid"),
                              (#"{"instance_uuid": "\#(instance)"}"#, "image_id"),
                              (#"{"instance_uuid": "\#(instance)", "image_id": "../../etc"}"#, "image_id"),
                              (#"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "flavor": "m1"}"#, "flavor")] {
            let (s, o) = try post(body)
            #expect(s == 400 && message(o).hasPrefix("'\(field)'"), "\(body): \(s) \(message(o))")
        }
        let (notJSON, nj) = try post("{instance_uuid")
        #expect(notJSON == 400 && message(nj).contains("not JSON"), "\(message(nj))")
        let (array, ar) = try post("[1, 2]")
        #expect(array == 400 && message(ar).contains("JSON object"), "\(message(ar))")
        let big = #"{"instance_uuid": "\#(instance)", "image_id": "\#(id)", "pad": ""# + String(repeating: "x", count: 70_000) + #""}"#
        #expect(try post(big).0 == 413)
        #expect(try post(#"{"instance_uuid": "\#(instance)", "image_id": "\#(id)"}"#, query: "?wait=maybe").0 == 400)
        #expect(try a.request("POST", "/v1/bases/gc?idle=1e300").0 == 400)
        #expect(try a.request("GET", "/v1/jobs/not-a-job").0 == 400)
        #expect(try a.request("GET", "/v1/health").0 == 200)
    }

    /// `POST /v1/disks?wait=false` answers 202 with a job at once; the job says when the disk is ready.
    @Test func diskCreateWithoutWaitingIsAJob() async throws {
        let id = try await OpenStack.createSampleImage("qcow2-zlib.qcow2", diskFormat: "qcow2", name: "hardening-job")
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess()
        try a.start()
        defer { a.stop() }
        let instance = UUID().uuidString.lowercased()
        let (s, o) = try a.request("POST", "/v1/disks?wait=false", json: #"{"instance_uuid": "\#(instance)", "image_id": "\#(id)"}"#)
        let job = try #require(o as? [String: Any], "\(s)")
        #expect(s == 202 && job["kind"] as? String == "disk" && job["disk"] as? String == "\(instance)_disk", "\(job)")
        let jobID = try #require(job["id"] as? String)
        var state = ""
        for _ in 0..<600 where state != "ready" && state != "error" {
            try await Task.sleep(for: .milliseconds(100))
            state = (try a.request("GET", "/v1/jobs/\(jobID)").1 as? [String: Any])?["state"] as? String ?? ""
        }
        #expect(state == "ready", "\(a.log().suffix(2000))")
        #expect(try a.request("GET", "/v1/disks/\(instance)_disk").0 == 200)
        #expect(try a.request("DELETE", "/v1/disks/\(instance)_disk").0 == 204)
    }

    /// Every number and duration in the config is range-checked at start-up; the error names the section and the
    /// key, and the agent exits 2 instead of trapping later (a gc_interval of 1e300 s used to overflow a sleep).
    @Test func configValuesAreRangeChecked() throws {
        for (section, key, value) in [("disks", "gc_interval", "1e300"), ("agent", "idle_timeout", "0"),
                                      ("rbd", "lease", "1"), ("prefetch", "interval", "99999999999999999999d"),
                                      ("cache", "max_size", "9999P"), ("disks", "max_size", "65T"),
                                      ("agent", "max_connections_per_uid", "0"), ("cache", "scrub_interval", "1s"),
                                      ("cache", "check_interval", "0.5s")] {
            let a = try AgentProcess([section: [key: value]])
            try a.start(waitForHealth: false)
            let status = a.waitForExit(seconds: 20)
            #expect(status == 2, "[\(section)] \(key) = \(value): exit \(String(describing: status)): \(a.log().suffix(500))")
            #expect(a.log().contains("[\(section)] \(key)") && a.log().contains("out of range") || a.log().contains("not a"),
                    "\(a.log().suffix(500))")
            a.stop()
        }
    }

    /// A connection that sends nothing is closed after [agent] idle_timeout; one that streams events is not.
    @Test func idleConnectionsAreClosed() throws {
        let a = try AgentProcess(["agent": ["idle_timeout": "1"]])
        try a.start()
        defer { a.stop() }
        let quiet = try UnixClient(a.socket)
        let started = Date()
        let (_, closed) = quiet.readUntilClosed(timeout: 5)
        #expect(closed, "an idle connection stayed open")
        #expect(Date().timeIntervalSince(started) < 3)
        let events = try UnixClient(a.socket)
        events.send("GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n")
        let (head, eventsClosed) = events.readUntilClosed(timeout: 3)
        #expect(head.hasPrefix("HTTP/1.1 200") && !eventsClosed, "an event stream was cut: \(head)")
        let kept = try UnixClient(a.socket)
        #expect(kept.request("GET", "/v1/health").0 == 200)
        #expect(kept.request("GET", "/v1/health").0 == 200, "keep-alive within the timeout")
    }

    /// A peer the policy refuses gets 403 and then the connection is closed; allowed_gids matches the peer's
    /// supplementary groups too.
    @Test func refusedPeersAreAnsweredAndClosedAndGroupsCount() throws {
        let a = try AgentProcess(["agent": ["socket_mode": "0666", "allowed_gids": "4242"]])
        try a.start()
        defer { a.stop() }
        // nobody (65534), no allowed group: 403, then the server closes the connection.
        let refused = try shell(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", Self.rawClient, a.socket])
        #expect(refused.out.hasPrefix("HTTP/1.1 403"), "\(refused.out) \(refused.err)")
        #expect(refused.out.hasSuffix("CLOSED\n"), "the refused connection stayed open: \(refused.out)")
        // nobody with 4242 as a supplementary group: allowed.
        let member = try shell(["setpriv", "--reuid=65534", "--regid=65534", "--groups=4242", "curl", "-s", "-o", "/dev/null",
                                "-w", "%{http_code}", "--unix-socket", a.socket, "http://agent/v1/health"])
        #expect(member.out == "200", "\(member.out) \(member.err)")
        let (primary, _) = try a.request("GET", "/v1/health", asUser: 65534)
        #expect(primary == 403)
    }

    /// Sends one request and reports the answer, then whether the server closed the connection.
    static let rawClient = """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(b"GET /v1/health HTTP/1.1\\r\\nHost: agent\\r\\n\\r\\n")
    s.settimeout(5)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                data += b"CLOSED\\n"
                break
            data += chunk
    except socket.timeout:
        data += b"OPEN\\n"
    sys.stdout.write(data.decode(errors="replace"))
    """

    /// 2,000 connections held open by a uid that is not allowed: each is answered and closed, at most
    /// [agent] max_connections_per_uid (64 by default) of them are ever held, and while the flood holds its
    /// connections an allowed client's health check answers in under 100 ms.
    @Test func twoThousandConnectionsFromARefusedUIDDoNotDelayOthers() async throws {
        let a = try AgentProcess(["agent": ["socket_mode": "0666"]])
        try a.start()
        defer { a.stop() }
        let before = a.openDescriptors()
        let flood = Process()
        flood.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        flood.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-u", "-c", Self.flood, a.socket, "2000", "4"]
        let out = Pipe()
        flood.standardOutput = out
        try flood.run()
        // Measure from a thread of its own once the flood holds its connections (it says so on its first line).
        let (times, maxFDs, report) = await withCheckedContinuation { (c: CheckedContinuation<([Double], Int, String), Never>) in
            Thread {
                let reader = out.fileHandleForReading
                var text = ""
                while !text.contains("\n"), case let d = reader.availableData, !d.isEmpty { text += String(decoding: d, as: UTF8.self) }
                var times: [Double] = []
                var fds: [Int] = []
                for _ in 0..<50 {
                    guard let client = try? UnixClient(a.socket) else { continue }
                    let (status, seconds) = client.request("GET", "/v1/health")
                    times.append(status == 200 ? seconds : 99)
                    fds.append(a.openDescriptors())
                    usleep(40_000)
                }
                text += String(decoding: reader.readDataToEndOfFile(), as: UTF8.self)
                c.resume(returning: (times, fds.max() ?? 0, text))
            }.start()
        }
        flood.waitUntilExit()
        let worst = times.max() ?? 99
        print("connection flood: \(times.count) health checks while it held its connections, median \(Int(times.sorted()[times.count / 2] * 1000)) ms, worst \(Int(worst * 1000)) ms; at most \(maxFDs) descriptors (\(before) before); \(report.split(separator: "\n").joined(separator: ", "))")
        #expect(worst < 0.1, "slowest health check \(worst) s")
        #expect(times.count >= 45)
        #expect(maxFDs < before + 64 + 40, "the agent held \(maxFDs) descriptors (\(before) before the flood)")
        let numbers = report.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
        // opened, then still open at the end: every one was answered and closed.
        #expect(numbers.count == 2 && numbers[0] >= 1900 && numbers[1] == 0, "\(report)")
        #expect(try a.request("GET", "/v1/health").0 == 200)
    }

    /// Opens N connections as fast as it can and says how many, keeps them N seconds, and reports how many the
    /// server had not closed by then.
    static let flood = """
    import socket, sys, time
    path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            socks.append(s)
        except OSError:
            s.close()
    print("opened", len(socks), flush=True)
    time.sleep(hold)
    still = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(65536)
            while data:
                data = s.recv(65536)
        except BlockingIOError:
            still += 1
        except OSError:
            pass
    print("still-open", still, flush=True)
    """

    /// The local backend removes `disk`, the `disk.info` it wrote, and the instance directory only once empty:
    /// Nova's libvirt.xml and console.log beside the disk survive.
    @Test func localDeleteTouchesOnlyWhatTheAgentMade() async throws {
        let id = try await OpenStack.createSampleImage("qcow2-zlib.qcow2", diskFormat: "qcow2", name: "hardening-local")
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess()
        try a.start()
        defer { a.stop() }
        let withNova = UUID().uuidString.lowercased(), alone = UUID().uuidString.lowercased()
        for instance in [withNova, alone] {
            let (s, o) = try a.request("POST", "/v1/disks", json: #"{"instance_uuid": "\#(instance)", "image_id": "\#(id)"}"#)
            #expect(s == 201, "\(message(o))")
        }
        let dir = a.dir + "/state/instances/\(withNova)"
        #expect(FileManager.default.contents(atPath: dir + "/disk.info") == Data(#"{"\#(dir)/disk": "qcow2"}"#.utf8))
        for name in ["libvirt.xml", "console.log"] { FileManager.default.createFile(atPath: dir + "/" + name, contents: Data(name.utf8)) }
        #expect(try a.request("DELETE", "/v1/disks/\(withNova)_disk").0 == 204)
        #expect(!FileManager.default.fileExists(atPath: dir + "/disk"))
        #expect(!FileManager.default.fileExists(atPath: dir + "/disk.info"), "the agent's own disk.info stays")
        #expect(FileManager.default.contents(atPath: dir + "/libvirt.xml") == Data("libvirt.xml".utf8))
        #expect(FileManager.default.contents(atPath: dir + "/console.log") == Data("console.log".utf8))
        // A disk.info Nova rewrote is Nova's: it stays. Nothing else in the directory: it goes.
        let other = a.dir + "/state/instances/\(alone)"
        try Data(#"{"x": "raw"}"#.utf8).write(to: URL(fileURLWithPath: other + "/disk.info"))
        #expect(try a.request("DELETE", "/v1/disks/\(alone)_disk").0 == 204)
        #expect(FileManager.default.fileExists(atPath: other + "/disk.info"))
        try FileManager.default.removeItem(atPath: other + "/disk.info")
        let third = UUID().uuidString.lowercased()
        #expect(try a.request("POST", "/v1/disks", json: #"{"instance_uuid": "\#(third)", "image_id": "\#(id)"}"#).0 == 201)
        #expect(try a.request("DELETE", "/v1/disks/\(third)_disk").0 == 204)
        #expect(!FileManager.default.fileExists(atPath: a.dir + "/state/instances/\(third)"), "an emptied directory goes")
    }

    /// Files get their modes whatever the umask the agent was started under (it never changes it), and ids are
    /// normalised at the edge: an upper-case id names the same image and file as Glance's lower-case one.
    @Test func filesHaveTheirModesAndIDsAreNormalised() async throws {
        let bytes = OpenStack.testBytes(2 << 20, seed: 43)
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "hardening-files")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let a = try AgentProcess(["agent": ["socket_mode": "0660"]])
        try a.start(umask: "077")
        defer { a.stop() }
        let (s, _) = try a.request("PUT", "/v1/images/\(id.uppercased())")
        #expect(s == 202 || s == 200)
        let img = try await a.waitForImage(id)
        #expect(img["state"] as? String == "ready" && img["id"] as? String == id, "\(img)")
        let path = a.cacheDir + "/" + sha1Hex(id)
        #expect(img["path"] as? String == path)
        func mode(_ p: String) -> Int { ((try? FileManager.default.attributesOfItem(atPath: p))?[.posixPermissions] as? Int) ?? -1 }
        #expect(mode(path) == 0o644, "cache file mode \(String(mode(path), radix: 8))")
        #expect(mode(a.cacheDir) == 0o755, "cache directory mode \(String(mode(a.cacheDir), radix: 8))")
        #expect(mode(a.socket) == 0o660, "socket mode \(String(mode(a.socket), radix: 8))")
        #expect(try a.request("GET", "/v1/images/\(id.uppercased())").0 == 200)
        let instance = UUID().uuidString
        let (d, o) = try a.request("POST", "/v1/disks", json: #"{"instance_uuid": "\#(instance.uppercased())", "image_id": "\#(id.uppercased())"}"#)
        #expect(d == 201 && (o as? [String: Any])?["name"] as? String == "\(instance.lowercased())_disk", "\(message(o))")
        #expect(mode(a.dir + "/state/instances/\(instance.lowercased())/disk") == 0o644)
        #expect(try a.request("DELETE", "/v1/disks/\(instance.uppercased())_disk").0 == 204)
    }
}
