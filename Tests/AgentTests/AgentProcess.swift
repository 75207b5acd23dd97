import Crypto
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

    func start() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: imgconvBinary)
        p.arguments = ["agent", "--config", configPath, "--log-level", "debug"]
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let logFile = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        logFile.seekToEndOfFile()
        p.standardOutput = logFile
        p.standardError = logFile
        try p.run()
        process = p
        for _ in 0..<200 {
            if let (s, _) = try? request("GET", "/v1/health"), s == 200 { return }
            if !p.isRunning { throw OpenStack.FixtureError("the agent exited: \(log())") }
            usleep(50_000)
        }
        throw OpenStack.FixtureError("the agent did not answer on \(socket): \(log())")
    }

    func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

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
