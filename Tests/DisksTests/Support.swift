import AsyncHTTPClient
import Cache
import CephFixture
import Disks
import Foundation
import Glance
import OpenStackFixture
import RBD

let repository = OpenStack.repository

func temporaryDirectory(_ tag: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("imgconv-disks-\(tag)-\(UUID().uuidString.prefix(8))").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Glance as the agent sees it: Keystone password auth as the admin user.
func glanceSource() -> GlanceSource {
    let auth = KeystoneAuth(authURL: OpenStack.keystoneURL, credentials: .password(
        username: "admin", password: "secret", userDomain: "Default", project: "admin", projectDomain: "Default"),
        http: HTTPClient.shared)
    return GlanceSource(client: GlanceClient(http: HTTPClient.shared, endpoint: GlanceEndpoint(auth: auth)))
}

/// One compute node: its own cache directory, its own Ceph connection.
func node(_ dir: String, leaseSeconds: Int = 30) throws -> (DiskService, RBDBackend) {
    var s = RBDSettings(ceph: Ceph.user)
    s.leaseSeconds = leaseSeconds
    s.baseWait = 120
    let backend = RBDBackend(settings: s)
    let source = glanceSource()
    let cache = try ImageCache(config: CacheConfig(directory: dir + "/cache", indexPath: dir + "/index.sqlite"), source: source)
    return (DiskService(backend: backend, source: source, cache: cache), backend)
}

/// The raw bytes of an image as the oracle (qemu-img) reads them.
func expectedRaw(_ sample: String, format: String, dir: String) throws -> Data {
    let out = dir + "/expected-\(UUID().uuidString.prefix(6)).raw"
    let (rc, _) = try Ceph.run("qemu-img", ["convert", "-f", format, "-O", "raw", "\(repository)/samples/\(sample)", out])
    guard rc == 0 else { throw OpenStack.FixtureError("qemu-img convert \(sample) failed") }
    defer { try? FileManager.default.removeItem(atPath: out) }
    return try Data(contentsOf: URL(fileURLWithPath: out))
}

/// The clone's bytes as Ceph serves them (`rbd export`).
func exported(_ spec: String, dir: String) throws -> Data {
    let path = dir + "/export-\(UUID().uuidString.prefix(6)).raw"
    try Ceph.export(spec, to: path)
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try Data(contentsOf: URL(fileURLWithPath: path))
}

/// Bytes in 4 KiB units that hold something other than zeros: what a sparse import must write, at most.
func nonZeroUnitBytes(_ d: Data) -> UInt64 {
    var n: UInt64 = 0
    d.withUnsafeBytes { (b: UnsafeRawBufferPointer) in
        var off = 0
        while off < b.count {
            let end = min(off + 4096, b.count)
            if b[off..<end].contains(where: { $0 != 0 }) { n += UInt64(end - off) }
            off = end
        }
    }
    return n
}

/// Uploads a sample to the fixture's Glance as `diskFormat` (into `store` if given); returns the image record.
func upload(_ sample: String, diskFormat: String, name: String, store: String? = nil) async throws -> [String: Any] {
    try await OpenStack.createImage(try sampleBytes(sample), diskFormat: diskFormat, name: name, store: store)
}

/// What is left in the pool of an image's base (and its parts) and of an instance's disk.
func leftovers(_ backend: RBDBackend, image id: String, instance: String) async throws -> [String] {
    try await backend.poolContext().listImages().filter { $0.contains(id) || $0.hasPrefix(instance) }
}

func sampleBytes(_ name: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: "\(repository)/samples/\(name)")))
}

func newInstance() -> String { UUID().uuidString.lowercased() }
