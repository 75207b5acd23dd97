import Foundation
import RBD

/// The real single-node Ceph cluster that `scripts/ceph-cluster.sh start` runs, as tests see it. CI starts it and
/// sets IMGCONV_REQUIRE_CEPH=1, so a missing cluster fails there instead of skipping the RBD tests.
public enum Ceph {
    public static let env: [String: String] = {
        let dir = ProcessInfo.processInfo.environment["IMGCONV_CEPH_DIR"] ?? "/tmp/imgconv-ceph"
        var out: [String: String] = [:]
        if let text = try? String(contentsOfFile: dir + "/env", encoding: .utf8) {
            for line in text.split(separator: "\n") {
                guard let eq = line.firstIndex(of: "=") else { continue }
                out[String(line[..<eq])] = String(line[line.index(after: eq)...])
            }
        }
        let up = out["CEPH_CONF"] != nil && (try? RadosCluster(configuration(out))) != nil
        if !up {
            if ProcessInfo.processInfo.environment["IMGCONV_REQUIRE_CEPH"] == "1" {
                fatalError("IMGCONV_REQUIRE_CEPH=1 but no Ceph cluster answers: run scripts/ceph-cluster.sh start")
            }
            return [:]
        }
        return out
    }()

    public static var available: Bool { !env.isEmpty }
    public static var confPath: String { env["CEPH_CONF"]! }
    public static var fsid: String { env["CEPH_FSID"]! }

    /// The restricted user an operator gives the agent (`profile rbd` on vms and images).
    public static var user: CephConfiguration { configuration(env) }

    static func configuration(_ env: [String: String]) -> CephConfiguration {
        CephConfiguration(confPath: env["CEPH_CONF"], user: env["CEPH_USER"] ?? "imgconv",
                          keyring: env["CEPH_USER_KEYRING"], timeout: 10)
    }

    /// Runs a test oracle (rbd, qemu-img) to completion: its exit status and stdout.
    @discardableResult
    public static func run(_ tool: String, _ args: [String]) throws -> (status: Int32, out: Data) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [tool] + args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, data)
    }

    /// Runs the rbd CLI as admin (test oracle only); returns stdout.
    @discardableResult
    public static func rbd(_ args: [String]) throws -> Data {
        let (status, data) = try run("rbd", ["-c", confPath, "--id", "admin", "--keyring", env["CEPH_ADMIN_KEYRING"]!] + args)
        guard status == 0 else { throw CocoaError(.executableLoad, userInfo: ["rbd": args.joined(separator: " ")]) }
        return data
    }

    /// `rbd export POOL/IMAGE FILE`: the clone's bytes, as Ceph serves them.
    public static func export(_ spec: String, to path: String) throws {
        try? FileManager.default.removeItem(atPath: path)
        try rbd(["export", "--no-progress", spec, path])
    }

    /// A name no other test (or earlier run) uses.
    public static func uniqueName(_ prefix: String) -> String {
        "\(prefix)-\(UUID().uuidString.prefix(8).lowercased())"
    }
}
