import CephFixture
import Disks
import Foundation
import OpenStackFixture
import RBD
import Synchronization
import Testing

/// Instance disks on the real Ceph cluster, with images from the real Glance: the base path for every format,
/// base reuse, cluster-wide single flight between nodes, take-over from a dead builder, sizes, removal and GC.
@Suite("rbd disks", .enabled(if: Ceph.available && OpenStack.available), .serialized)
struct RBDDiskTests {
    @Test(arguments: [
        ("qcow2-zlib.qcow2", "qcow2"), ("qcow2-v3.qcow2", "qcow2"), ("vmdk-stream-optimized.vmdk", "vmdk"),
        ("vpc-dynamic.vhd", "vpc"), ("vdi-dynamic.vdi", "vdi"), ("base.raw", "raw"),
    ])
    func basePathBuildsOnceThenClones(sample: String, format: String) async throws {
        let dir = try temporaryDirectory("base")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let glanceFormat = format == "vpc" ? "vhd" : format
        let image = try await upload(sample, diskFormat: glanceFormat, name: "disks-\(sample)")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (service, backend) = try node(dir)
        let expected = try expectedRaw(sample, format: format, dir: dir)

        let first = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id))
        #expect(first.method == .baseBuilt)
        #expect(first.parent == "vms/imgconv-base-\(id)@imgconv")
        #expect(first.size == UInt64(expected.count))
        // Only data went into Ceph: never a zero run.
        #expect(first.bytesWritten == nonZeroUnitBytes(expected))
        #expect(try exported(first.location, dir: dir) == expected)
        // A raw image went straight from Glance into Ceph: no local copy, not even in the cache.
        if format == "raw" { #expect(try await service.cache.image(id) == nil) }

        let second = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id))
        #expect(second.method == .baseReused)
        #expect(second.bytesWritten == 0)
        #expect(try exported(second.location, dir: dir) == expected)
        #expect(backend.stats.snapshot == RBDBackend.Stats(glanceClones: 0, basesBuilt: 1, baseClones: 2, takeovers: 0))

        // Listed, with their parent and image; the base itself is not a disk.
        let listed = try await backend.list().filter { [first.name, second.name].contains($0.name) }
        #expect(listed.count == 2)
        #expect(listed.allSatisfy { $0.parent == first.parent && $0.imageID == id })

        // The base stays while it has children; once they are gone GC removes it.
        // Each test names its own image, so no other test's GC (they share the pool) takes this base's lease.
        #expect(try await backend.collectGarbage(idleSeconds: 0, images: [id]).isEmpty)
        try await backend.remove(first.name)
        try await backend.remove(second.name)
        await #expect(throws: DiskError.self) { try await backend.remove(second.name) }
        #expect(try await backend.collectGarbage(idleSeconds: 3600, images: [id]).isEmpty)
        #expect(try await backend.collectGarbage(idleSeconds: 0, images: [id]) == ["imgconv-base-\(id)"])
        #expect(try await !backend.poolContext().imageExists("imgconv-base-\(id)"))
    }

    @Test func sizesAndNames() async throws {
        let dir = try temporaryDirectory("sizes")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try await upload("qcow2-v3.qcow2", diskFormat: "qcow2", name: "disks-sizes")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (service, backend) = try node(dir)
        let virtual = UInt64(try expectedRaw("qcow2-v3.qcow2", format: "qcow2", dir: dir).count)

        await #expect(throws: DiskError.self) {
            try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id, size: virtual - 512))
        }
        let big = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id, size: 64 << 20))
        #expect(big.size == 64 << 20)
        let data = try exported(big.location, dir: dir)
        #expect(data.count == 64 << 20)
        #expect(data.prefix(Int(virtual)) == (try expectedRaw("qcow2-v3.qcow2", format: "qcow2", dir: dir)))
        #expect(data.suffix(from: Int(virtual)).allSatisfy { $0 == 0 })
        // The same instance twice is a conflict, not a second disk.
        let again = big.name.replacingOccurrences(of: "_disk", with: "")
        await #expect(throws: DiskError.self) { try await service.create(DiskRequest(instanceUUID: again, imageID: id)) }
        // Names that are not <uuid>_disk never reach Ceph.
        for bad in ["../etc", "imgconv-base-\(id)", "x_disk", "\(newInstance())_disk/../../y"] {
            await #expect(throws: DiskError.self) { try await backend.remove(bad) }
        }
        await #expect(throws: DiskError.self) { try await service.create(DiskRequest(instanceUUID: "nonsense", imageID: id)) }
        let flat = try await backend.flatten(big.name)
        #expect(flat.parent == nil)
        try await backend.remove(big.name)
        _ = try await backend.collectGarbage(idleSeconds: 0, images: [id])
    }

    /// A qcow2 registered as raw (CVE-2024-40767) is streamed into Ceph as raw, then refused by the inspection
    /// before anything is published: no base, no part, no disk.
    @Test func hostileRawIsRefusedBeforePublishing() async throws {
        let dir = try temporaryDirectory("hostile")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try await upload("qcow2-v3.qcow2", diskFormat: "raw", name: "disks-hostile")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (service, backend) = try node(dir)
        let instance = newInstance()
        do {
            _ = try await service.create(DiskRequest(instanceUUID: instance, imageID: id))
            Issue.record("a qcow2 declared raw became a disk")
        } catch let e as DiskError {
            guard case .unsafe = e else { Issue.record("expected unsafe, got \(e)"); return }
            #expect(e.description.contains("qcow2"), "\(e)")
        }
        let left = try await leftovers(backend, image: id, instance: instance)
        #expect(left.isEmpty, "\(left)")
    }

    /// Hostile images on the path that converts while it downloads: the full inspection of the complete file
    /// refuses them before anything is published, and the part is removed.
    @Test(arguments: ["truncated", "polyglot"])
    func hostileImagesAreRefusedWhileStreaming(kind: String) async throws {
        let dir = try temporaryDirectory("hostile-stream")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var bytes = try sampleBytes("qcow2-v3.qcow2")
        if kind == "truncated" {
            // Its last clusters are cut off: L2 entries point past the end of the file. (Glance's own inspector
            // already refuses a qcow2 with a backing file, so that case never reaches the agent.)
            bytes.removeLast(128 << 10)
        } else {
            // A qcow2 with a VHD footer appended: two formats at once.
            bytes += try sampleBytes("vpc-fixed.vhd").suffix(512)
        }
        let image = try await OpenStack.createImage(bytes, diskFormat: "qcow2", name: "disks-hostile-\(kind)")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (service, backend) = try node(dir)
        let instance = newInstance()
        do {
            _ = try await service.create(DiskRequest(instanceUUID: instance, imageID: id))
            Issue.record("a hostile qcow2 (\(kind)) became a disk")
        } catch {
            let text = "\(error)"
            #expect(kind == "polyglot" ? text.contains("multiple formats") : text.contains("past the end") || text.contains("end of"),
                    "\(text)")
        }
        let left = try await leftovers(backend, image: id, instance: instance)
        #expect(left.isEmpty, "\(left)")
        let temporaries = (try? FileManager.default.contentsOfDirectory(atPath: dir + "/cache")) ?? []
        #expect(!temporaries.contains { $0.hasPrefix(".stream") }, "\(temporaries)")
    }

    /// Three nodes (three caches, three Ceph clients) ask for the same new image at once: one builds, two clone.
    @Test func clusterWideSingleFlight() async throws {
        let dir = try temporaryDirectory("flight")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try await upload("qcow2-zlib.qcow2", diskFormat: "qcow2", name: "disks-flight")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let nodes = try (0..<3).map { try node(dir + "/node\($0)") }
        let disks = try await withThrowingTaskGroup(of: DiskInfo.self) { g in
            for (service, _) in nodes {
                g.addTask { try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id)) }
            }
            return try await g.reduce(into: [DiskInfo]()) { $0.append($1) }
        }
        #expect(disks.filter { $0.method == .baseBuilt }.count == 1)
        #expect(disks.filter { $0.method == .baseReused }.count == 2)
        #expect(nodes.map { $0.1.stats.snapshot.basesBuilt }.reduce(0, +) == 1)
        #expect(nodes.map { $0.1.stats.snapshot.takeovers }.reduce(0, +) == 0)
        let expected = try expectedRaw("qcow2-zlib.qcow2", format: "qcow2", dir: dir)
        for d in disks { #expect(try exported(d.location, dir: dir) == expected) }
        for d in disks { try await nodes[0].1.remove(d.name) }
        _ = try await nodes[0].1.collectGarbage(idleSeconds: 0, images: [id])
    }

    /// The lease object records a published base's size (`imgconv.ready`), which waiters read instead of opening
    /// the base. The record follows the base: written by the builder, written again by the next agent that finds a
    /// base without one, survived when the base is removed by hand (the next disk rebuilds it), removed by GC.
    @Test func theReadyRecordFollowsTheBase() async throws {
        let dir = try temporaryDirectory("ready")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try await upload("qcow2-zlib.qcow2", diskFormat: "qcow2", name: "disks-ready")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let (service, backend) = try node(dir)
        let io = try await backend.poolContext()
        let lease = "imgconv-lease.\(id)", base = "imgconv-base-\(id)"
        func record() throws -> String? { try io.xattr(object: lease, name: "imgconv.ready").map { String(decoding: $0, as: UTF8.self) } }
        let expected = try expectedRaw("qcow2-zlib.qcow2", format: "qcow2", dir: dir)

        let first = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id))
        #expect(first.method == .baseBuilt)
        #expect(try record() == String(expected.count))

        // A base published without the record (an agent of an earlier version): found under the lease, recorded.
        #expect(try io.lease(object: lease, name: "build", cookie: "test", description: "test", seconds: 10, renew: false))
        #expect(try io.guardedSetXattr(object: lease, lock: "build", cookie: "test", name: "imgconv.ready", value: nil))
        try io.releaseLease(object: lease, name: "build", cookie: "test")
        #expect(try record() == nil)
        let second = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id))
        #expect(second.method == .baseReused)
        #expect(try record() == String(expected.count))

        // The base removed by hand: the record is stale, the clone finds no parent, the base is built again.
        try await backend.remove(first.name)
        try await backend.remove(second.name)
        let img = try io.openImage(base)
        try img.unprotectSnapshot("imgconv")
        try img.removeSnapshot("imgconv")
        img.close()
        try io.removeImage(base)
        #expect(try record() != nil)
        let third = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id))
        #expect(third.method == .baseBuilt)
        #expect(try exported(third.location, dir: dir) == expected)
        #expect(backend.stats.snapshot.basesBuilt == 2)

        // GC drops the record with the base.
        try await backend.remove(third.name)
        #expect(try await backend.collectGarbage(idleSeconds: 0, images: [id]) == [base])
        #expect(try record() == nil)
        #expect(try !io.imageExists(base))
    }

    /// A builder that died mid-import: its lease (3 s) is left unrenewed and its half-written part is in the pool.
    /// The next agent waits for the lease to expire, removes the part, builds the base itself; the part is never
    /// cloned.
    @Test func takesOverFromADeadBuilder() async throws {
        let dir = try temporaryDirectory("takeover")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = try await upload("vdi-dynamic.vdi", diskFormat: "vdi", name: "disks-takeover")
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }

        let dead = try RadosCluster(Ceph.user).ioContext(pool: "vms")
        #expect(try dead.lease(object: "imgconv-lease.\(id)", name: "build", cookie: "dead-agent", description: "test", seconds: 3, renew: false))
        let part = "imgconv-base-\(id).part-deadbeef"
        try dead.createImage(part, size: 4 << 20)
        let img = try dead.openImage(part)
        try [UInt8](repeating: 0xEE, count: 4096).withUnsafeBytes { try img.write($0, at: 0) }
        img.close()

        let (service, backend) = try node(dir)
        let started = Date()
        let disk = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id))
        let waited = Date().timeIntervalSince(started)
        #expect(waited >= 2, "built after \(waited) s, before the dead builder's lease expired")
        #expect(disk.method == .baseBuilt)
        #expect(backend.stats.snapshot.takeovers == 1)
        #expect(try exported(disk.location, dir: dir) == (try expectedRaw("vdi-dynamic.vdi", format: "vdi", dir: dir)))
        #expect(try !dead.imageExists(part))
        try await backend.remove(disk.name)
        _ = try await backend.collectGarbage(idleSeconds: 0, images: [id])
    }

    /// A raw image Glance keeps in this cluster: cloned from Glance's own snapshot, nothing downloaded or written.
    @Test func glanceRBDImageIsClonedWithoutADownload() async throws {
        let store = try #require(OpenStack.rbdStore, "the fixture's Glance has no Ceph store (start it with IMGCONV_CEPH_ENV)")
        let dir = try temporaryDirectory("glance-clone")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let bytes = OpenStack.testBytes(12 << 20, seed: 11)
        let image = try await OpenStack.createImage(bytes, diskFormat: "raw", name: "disks-rbd-raw", store: store)
        let id = image["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let location = "rbd://\(Ceph.fsid)/images/\(id)/snap"
        #expect((image["direct_url"] as? String) == location)
        let (service, backend) = try node(dir)

        await #expect(throws: DiskError.self) {
            try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id, size: UInt64(bytes.count) - 4096))
        }
        let disk = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: id, size: 20 << 20))
        #expect(disk.method == .glanceClone)
        #expect(disk.parent == "images/\(id)@snap")
        #expect(disk.bytesWritten == 0)
        #expect(disk.size == 20 << 20)
        #expect(OpenStack.fileRequests(id) == 0, "the clone path downloaded the image")
        let data = try exported(disk.location, dir: dir)
        #expect(data.prefix(bytes.count) == Data(bytes))
        #expect(data.count == 20 << 20 && data.suffix(from: bytes.count).allSatisfy { $0 == 0 })
        #expect(backend.stats.snapshot.glanceClones == 1)

        // A qcow2 kept in Ceph cannot be cloned as a disk: it takes the base path instead.
        let q = try await upload("qcow2-zlib.qcow2", diskFormat: "qcow2", name: "disks-rbd-qcow2", store: store)
        let qid = q["id"] as! String
        defer { Task { await OpenStack.deleteImage(qid) } }
        let qdisk = try await service.create(DiskRequest(instanceUUID: newInstance(), imageID: qid))
        #expect(qdisk.method == .baseBuilt)
        #expect(try exported(qdisk.location, dir: dir) == (try expectedRaw("qcow2-zlib.qcow2", format: "qcow2", dir: dir)))

        try await backend.remove(disk.name)
        try await backend.remove(qdisk.name)
        _ = try await backend.collectGarbage(idleSeconds: 0, images: [id, qid])
    }

    /// The Glance-clone path inspects before it clones: a qcow2 (header at the start) or a fixed VHD (footer at
    /// the end) that Glance keeps in Ceph as "raw" is refused, and nothing is cloned.
    @Test func glanceSnapshotIsInspectedBeforeItIsCloned() async throws {
        let store = try #require(OpenStack.rbdStore, "the fixture's Glance has no Ceph store (start it with IMGCONV_CEPH_ENV)")
        let dir = try temporaryDirectory("glance-clone-hostile")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (service, backend) = try node(dir)
        for (sample, found) in [("qcow2-v3.qcow2", "qcow2"), ("vpc-fixed.vhd", "vpc")] {
            let image = try await upload(sample, diskFormat: "raw", name: "disks-rbd-hostile", store: store)
            let id = image["id"] as! String
            defer { Task { await OpenStack.deleteImage(id) } }
            #expect((image["direct_url"] as? String) == "rbd://\(Ceph.fsid)/images/\(id)/snap")
            let instance = newInstance()
            do {
                _ = try await service.create(DiskRequest(instanceUUID: instance, imageID: id))
                Issue.record("\(sample) registered as raw was cloned")
            } catch let DiskError.unsafe(_, reasons) {
                #expect(reasons.joined().contains("format-mismatch") && reasons.joined().contains(found), "\(reasons)")
            }
            #expect(try await leftovers(backend, image: id, instance: instance).isEmpty)
            #expect(backend.stats.snapshot.glanceClones == 0)
            #expect(OpenStack.fileRequests(id) == 0)
        }
    }
}
