import CephFixture
import Crypto
import Dispatch
import Foundation
import OpenStackFixture
#if canImport(Glibc)
import Glibc
#endif

/// The built `imgconv` binary, next to the test bundle.
let imgconvBinary: String = {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("imgconv").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    return FileManager.default.currentDirectoryPath + "/.build/debug/imgconv"
}()

/// Runs a command to completion.
@discardableResult
func shell(_ args: [String], environment: [String: String]? = nil) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    if let environment { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    // Polling loops run thousands of these: every descriptor goes back at once.
    try? out.fileHandleForReading.close()
    try? err.fileHandleForReading.close()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

func sha1Hex(_ s: String) -> String { Insecure.SHA1.hash(data: Array(s.utf8)).map { String(format: "%02x", $0) }.joined() }

/// A real `imgconv agent` process with its own config, socket, state and cache directories.
final class AgentProcess: @unchecked Sendable {
    let dir: String
    var socket: String { dir + "/agent.sock" }
    var cacheDir: String { dir + "/cache" }
    var configPath: String { dir + "/agent.conf" }
    var logPath: String { dir + "/agent.log" }
    private(set) var process: Process?

    /// `sections` are added to (or override) the defaults: Keystone admin credentials, the fixture's Glance.
    init(_ sections: [String: [String: String]] = [:]) throws {
        dir = NSTemporaryDirectory() + "imgconv-agent-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var config: [String: [String: String]] = [
            "agent": ["socket_path": socket, "state_dir": dir + "/state"],
            "glance": ["auth_url": OpenStack.keystoneURL, "username": "admin", "password": "secret", "project_name": "admin",
                       "num_retries": "4"],
            "cache": ["directory": cacheDir, "max_size": "2G"],
        ]
        for (s, kv) in sections { config[s, default: [:]].merge(kv) { $1 } }
        var text = ""
        for (s, kv) in config.sorted(by: { $0.key < $1.key }) {
            text += "[\(s)]\n" + kv.sorted { $0.key < $1.key }.map { "\($0.key) = \($0.value)\n" }.joined()
        }
        try text.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    /// Starts the agent and waits until it answers; `umask` runs it under that umask (through sh), `environment`
    /// adds variables. `waitForHealth: false` only launches it (a config it must refuse).
    func start(umask: String? = nil, environment: [String: String] = [:], waitForHealth: Bool = true) throws {
        let p = Process()
        if let umask {
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", "umask \(umask) && exec \"$0\" \"$@\"", imgconvBinary, "agent", "--config", configPath, "--log-level", "debug"]
        } else {
            p.executableURL = URL(fileURLWithPath: imgconvBinary)
            p.arguments = ["agent", "--config", configPath, "--log-level", "debug"]
        }
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let logFile = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        logFile.seekToEndOfFile()
        p.standardOutput = logFile
        p.standardError = logFile
        try p.run()
        process = p
        guard waitForHealth else { return }
        for _ in 0..<200 {
            if let (s, _) = try? request("GET", "/v1/health"), s == 200 { return }
            if !p.isRunning { throw OpenStack.FixtureError("the agent exited: \(log())") }
            usleep(50_000)
        }
        throw OpenStack.FixtureError("the agent did not answer on \(socket): \(log())")
    }

    func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    var pid: Int32? { process?.processIdentifier }
    var isRunning: Bool { process?.isRunning ?? false }

    /// Descriptors the agent holds open.
    func openDescriptors() -> Int {
        guard let pid else { return 0 }
        return ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count
    }

    /// Waits for the process to end; its exit status, or nil if it is still running after `seconds`.
    func waitForExit(seconds: Double) -> Int32? {
        guard let p = process else { return nil }
        let deadline = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning { return nil }
        p.waitUntilExit()
        return p.terminationStatus
    }

    /// An HTTP request over the control socket (curl, as an operator would).
    func request(_ method: String, _ path: String, asUser uid: UInt32? = nil, json: String? = nil, timeout: Int = 60) throws -> (Int, Any?) {
        var args = ["curl", "-s", "-m", "\(timeout)", "--unix-socket", socket, "-X", method, "-w", "\n%{http_code}", "http://agent" + path]
        if let json { args += ["-H", "Content-Type: application/json", "--data-binary", json] }
        if let uid { args = ["setpriv", "--reuid=\(uid)", "--regid=\(uid)", "--clear-groups"] + args }
        let r = try shell(args)
        let lines = r.out.split(separator: "\n", omittingEmptySubsequences: false)
        let code = Int(lines.last ?? "") ?? 0
        let body = lines.dropLast().joined(separator: "\n")
        return (code, body.isEmpty ? nil : try? JSONSerialization.jsonObject(with: Data(body.utf8)))
    }

    func image(_ id: String) throws -> [String: Any]? {
        let (s, o) = try request("GET", "/v1/images/\(id)")
        return s == 200 ? o as? [String: Any] : nil
    }

    /// Polls until the image is ready or failed.
    func waitForImage(_ id: String, timeout: Double = 120) async throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let i = try image(id), let s = i["state"] as? String, s == "ready" || s == "error" { return i }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        throw OpenStack.FixtureError("image \(id) not ready after \(timeout) s: \(log().suffix(2000))")
    }

    func cacheFiles() -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: cacheDir)) ?? []).sorted() }

    func signal(_ sig: Int32) {
        guard let p = process, p.isRunning else { return }
        kill(p.processIdentifier, sig)
    }

    /// SIGTERM and wait; returns the exit status.
    @discardableResult
    func stop() -> Int32 {
        guard let p = process else { return 0 }
        if p.isRunning { kill(p.processIdentifier, SIGTERM) }
        let deadline = Date().addingTimeInterval(20)
        while p.isRunning && Date() < deadline { usleep(50_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        process = nil
        return p.terminationStatus
    }

    func kill9() {
        guard let p = process else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        process = nil
    }

    deinit {
        if let p = process, p.isRunning { kill(p.processIdentifier, SIGKILL) }
    }
}

/// A raw client on a Unix socket, for what curl cannot show: when the server closes, and how long an answer takes.
final class UnixClient {
    let fd: Int32

    init(_ path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EMFILE) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in Array(path.utf8).enumerated() { p[i] = b }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: e) ?? .EIO)
        }
    }

    deinit { close(fd) }

    func send(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads until the server closes or `timeout` passes: (bytes, closed by the server).
    func readUntilClosed(timeout: Double) -> (String, Bool) {
        var out: [UInt8] = []
        let deadline = Date().addingTimeInterval(timeout)
        var buf = [UInt8](repeating: 0, count: 65536)
        while Date() < deadline {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = Int32(max(1, deadline.timeIntervalSinceNow * 1000))
            guard poll(&p, 1, ms) > 0 else { continue }
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return (String(decoding: out, as: UTF8.self), true) }
            out += buf[0..<n]
        }
        return (String(decoding: out, as: UTF8.self), false)
    }

    /// One HTTP/1.1 request on this connection: (status, seconds to the complete answer).
    func request(_ method: String, _ path: String) -> (Int, Double) {
        let started = DispatchTime.now().uptimeNanoseconds
        send("\(method) \(path) HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\n\r\n")
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            got += buf[0..<n]
            let text = String(decoding: got, as: UTF8.self)
            if let end = text.range(of: "\r\n\r\n"), let cl = text.range(of: "content-length: ", options: .caseInsensitive) {
                let len = Int(text[cl.upperBound...].prefix { $0.isNumber }) ?? 0
                if got.count >= text.utf8.distance(from: text.utf8.startIndex, to: end.upperBound.samePosition(in: text.utf8)!) + len { break }
            }
        }
        let text = String(decoding: got, as: UTF8.self)
        let status = Int(text.dropFirst(9).prefix(3)) ?? 0
        return (status, Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9)
    }
}

/// Runs a blocking call (a request through curl, a shell command) on a thread of its own and returns a task to
/// await. Swift's cooperative pool has one thread per core, two here: blocking calls in tasks would run two at a
/// time, and stall every other task of the test, including the one that measures.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) -> Task<T, any Error> {
    Task {
        try await withCheckedThrowingContinuation { continuation in
            Thread { continuation.resume(with: Result { try body() }) }.start()
        }
    }
}

extension AgentProcess {
    /// A running agent whose disks are RBD clones on the test cluster, as the restricted user an operator makes
    /// (README "Ceph set-up"). `extra` adds or overrides config keys, `environment` the process's variables.
    static func rbd(_ extra: [String: [String: String]] = [:], lease: String = "30",
                    environment: [String: String] = [:]) throws -> AgentProcess {
        var sections = ["rbd": ["ceph_conf": Ceph.confPath, "user": Ceph.env["CEPH_USER"] ?? "imgconv",
                                "keyring": Ceph.env["CEPH_USER_KEYRING"]!, "lease": lease],
                        "cache": ["max_size": "8G"]]
        for (s, kv) in extra { sections[s, default: [:]].merge(kv) { $1 } }
        let a = try AgentProcess(sections)
        try a.start(environment: environment)
        return a
    }
}

/// The body of `POST /v1/disks`.
func diskBody(_ instance: String, _ image: String) -> String { #"{"instance_uuid": "\#(instance)", "image_id": "\#(image)"}"# }
