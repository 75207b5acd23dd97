import CephFixture
import Foundation
import RBD
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The binding against the real cluster, as the restricted `profile rbd` user the agent runs as.
@Suite("librbd binding", .enabled(if: Ceph.available), .serialized)
struct RBDTests {
    let cluster: RadosCluster
    let vms: IOContext

    init() throws {
        cluster = try RadosCluster(Ceph.user)
        vms = try cluster.ioContext(pool: "vms")
    }

    @Test func fsidAndPools() throws {
        #expect(try cluster.fsid() == Ceph.fsid)
        let pools = try cluster.pools()
        #expect(pools.contains("vms") && pools.contains("images"))
    }

    @Test func imageLifecycleWritesSnapshotsAndClones() throws {
        let base = Ceph.uniqueName("t-base"), child = Ceph.uniqueName("t-child")
        try vms.createImage(base, size: 16 << 20)
        #expect(try vms.listImages().contains(base))
        let img = try vms.openImage(base)
        #expect(try img.stat().size == 16 << 20)
        #expect(try img.stat().objectSize == 4 << 20)

        // aio writes in flight together, then a discard of the middle of the second one
        let a = [UInt8](repeating: 0xA5, count: 1 << 20), b = [UInt8](repeating: 0x5A, count: 1 << 20)
        try a.withUnsafeBytes { pa in
            try b.withUnsafeBytes { pb in
                let c1 = try img.aioWrite(pa, at: 0)
                let c2 = try img.aioWrite(pb, at: 8 << 20)
                try c1.wait()
                try c2.wait()
            }
        }
        try img.flush()
        var back = [UInt8](repeating: 0, count: 16384)
        var n = try back.withUnsafeMutableBytes { try img.read(at: 8 << 20, into: $0) }
        #expect(n == 16384 && back.allSatisfy { $0 == 0x5A })
        // A discard of a whole object reads back as zeros (librbd skips partial-object discards by default).
        try img.discard(at: 8 << 20, length: 4 << 20)
        n = try back.withUnsafeMutableBytes { try img.read(at: 8 << 20, into: $0) }
        #expect(n == 16384 && back.allSatisfy { $0 == 0 })
        _ = try back.withUnsafeMutableBytes { try img.read(at: 0, into: $0) }
        #expect(back.allSatisfy { $0 == 0xA5 })

        try img.resize(32 << 20)
        #expect(try img.stat().size == 32 << 20)
        try img.createSnapshot("s1")
        try img.protectSnapshot("s1")
        #expect(try img.isProtected("s1"))
        #expect(try img.snapshots().map(\.name) == ["s1"])
        try img.setMetadata("imgconv.test", "42")
        #expect(try img.metadata("imgconv.test") == "42")
        #expect(try img.metadata("imgconv.absent") == nil)

        try vms.clone(parent: base, snapshot: "s1", into: vms, name: child)
        let c = try vms.openImage(child)
        #expect(try c.parent() == ParentSpec(pool: "vms", image: base, snapshot: "s1"))
        let atSnap = try vms.openImage(base, snapshot: "s1")
        #expect(try atSnap.children() == ["vms/\(child)"])
        // The clone reads its parent's data
        var first = [UInt8](repeating: 0, count: 4096)
        _ = try first.withUnsafeMutableBytes { try c.read(at: 0, into: $0) }
        #expect(first.allSatisfy { $0 == 0xA5 })

        // Unprotecting a snapshot with children is refused, with the errno and the operation named
        let busy = #expect(throws: CephError.self) { try img.unprotectSnapshot("s1") }
        #expect(busy?.errnoName == "EBUSY")
        #expect(busy?.description.contains("rbd_snap_unprotect(vms/\(base)@s1)") == true)

        try c.flatten()
        #expect(try c.parent() == nil)
        #expect(try atSnap.children() == [])
        atSnap.close()
        c.close()
        try vms.removeImage(child)
        try img.unprotectSnapshot("s1")
        try img.removeSnapshot("s1")
        img.close()
        try vms.removeImage(base)
        #expect(try !vms.imageExists(base))
    }

    @Test func typedErrors() throws {
        let missing = #expect(throws: CephError.self) { _ = try vms.openImage("no-such-image") }
        #expect(missing?.errnoName == "ENOENT")
        #expect(missing?.operation == "rbd_open(vms/no-such-image)")
        let pool = #expect(throws: CephError.self) { _ = try cluster.ioContext(pool: "no-such-pool") }
        #expect(pool?.errnoName == "ENOENT")
        // profile rbd grants nothing on a pool it does not name
        let admin = try RadosCluster(CephConfiguration(confPath: Ceph.confPath, user: "admin",
                                                       keyring: Ceph.env["CEPH_ADMIN_KEYRING"]))
        #expect(try admin.fsid() == Ceph.fsid)
    }

    @Test func leasesExcludeOthersAndExpire() throws {
        let other = try RadosCluster(Ceph.user).ioContext(pool: "vms")
        let object = Ceph.uniqueName("t-lease")
        defer { try? vms.removeObject(object) }
        #expect(try vms.lease(object: object, name: "build", cookie: "a", description: "test", seconds: 2, renew: false))
        #expect(try vms.lease(object: object, name: "build", cookie: "a", description: "test", seconds: 2, renew: true))
        #expect(try !other.lease(object: object, name: "build", cookie: "b", description: "test", seconds: 2, renew: false))
        let holders = try other.lockers(object: object, name: "build")
        #expect(holders.count == 1 && holders.first?.cookie == "a")
        #expect(holders.first?.client == "client.\(vms.cluster.instanceID)")
        // The holder stops renewing (as a killed agent would): Ceph expires the lease.
        Thread.sleep(forTimeInterval: 2.5)
        #expect(try other.lease(object: object, name: "build", cookie: "b", description: "test", seconds: 30, renew: false))
        // ... and the first holder can no longer renew it.
        #expect(try !vms.lease(object: object, name: "build", cookie: "a", description: "test", seconds: 2, renew: true))
        try other.releaseLease(object: object, name: "build", cookie: "b")
        #expect(try vms.lease(object: object, name: "build", cookie: "a", description: "test", seconds: 2, renew: false))
    }

    /// Every client is counted while open and shut down when its last reference goes (a client open at exit
    /// crashes there: scripts/librados-exit.sh shows it).
    @Test func clientsAreCountedUntilReleased() throws {
        let label = Ceph.uniqueName("probe")
        do {
            let c = try RadosCluster(Ceph.user, label: label)
            _ = try c.fsid()
            #expect(LiveClients.labels.contains(label))
        }
        #expect(!LiveClients.labels.contains(label))
    }

    /// A watch wakes its waiters on another client's notify (acknowledged, so the notify does not wait out its
    /// timeout), waits out its timeout without one, and once closed gets nothing more.
    @Test func watchWakesOnNotify() async throws {
        let object = Ceph.uniqueName("watch")
        let a = try RadosCluster(Ceph.user, label: "watch A").ioContext(pool: "vms")
        let b = try RadosCluster(Ceph.user, label: "watch B").ioContext(pool: "vms")
        defer { try? b.removeObject(object) }
        #expect(throws: CephError.self) { _ = try a.watch(object: object) }  // the object must exist
        #expect(try b.lease(object: object, name: "build", cookie: "cb", description: "test", seconds: 30, renew: false))
        let watch = try a.watch(object: object)
        #expect(watch.generation == 0)

        var clock = ContinuousClock.now
        await watch.changed(since: 0, timeout: .milliseconds(300))
        #expect(ContinuousClock.now - clock >= .milliseconds(300))
        #expect(watch.generation == 0)

        let seen = watch.generation
        let waiting = Task { await watch.changed(since: seen, timeout: .seconds(20)) }
        try await Task.sleep(for: .milliseconds(100))
        clock = ContinuousClock.now
        try b.notify(object: object, timeoutMilliseconds: 10_000)
        #expect(ContinuousClock.now - clock < .seconds(5), "the notify waited for an acknowledgement that never came")
        await waiting.value
        #expect(ContinuousClock.now - clock < .seconds(5))
        #expect(watch.generation == 1)
        // A notify that came before the wait: returns at once.
        await watch.changed(since: 0, timeout: .seconds(20))

        watch.close()
        let after = watch.generation
        try b.notify(object: object, timeoutMilliseconds: 10_000)
        #expect(watch.generation == after)
        try b.releaseLease(object: object, name: "build", cookie: "cb")
    }

    /// The fencing primitives a build lease is made of: a write guarded by the lock (cls_lock assert_locked), the
    /// client's address, and the blocklist, after which the fenced client's calls fail with ESHUTDOWN.
    @Test func guardedWritesNeedTheLockAndBlocklistingFences() throws {
        let object = Ceph.uniqueName("fence")
        let a = try RadosCluster(Ceph.user, label: "fence A").ioContext(pool: "vms")
        let b = try RadosCluster(Ceph.user, label: "fence B").ioContext(pool: "vms")
        defer { try? b.removeObject(object) }
        #expect(try a.lease(object: object, name: "build", cookie: "ca", description: "test", seconds: 2, renew: false))
        let addressA = try a.cluster.address()
        #expect(addressA.contains(":") && addressA.contains("/"), "\(addressA)")
        #expect(try a.guardedSetXattr(object: object, lock: "build", cookie: "ca", name: "imgconv.builder", value: Array("ca \(addressA)".utf8)))
        // B holds no lock: its guarded write is refused and changes nothing.
        #expect(try !b.guardedSetXattr(object: object, lock: "build", cookie: "cb", name: "imgconv.builder", value: Array("cb".utf8)))
        #expect(try b.xattr(object: object, name: "imgconv.builder") == Array("ca \(addressA)".utf8))
        // A's lease expires; B takes it, reads who held it, and fences that client.
        Thread.sleep(forTimeInterval: 2.5)
        #expect(try !a.guardedSetXattr(object: object, lock: "build", cookie: "ca", name: "imgconv.builder", value: Array("late".utf8)),
                "an expired lock still allowed a guarded write")
        #expect(try b.lease(object: object, name: "build", cookie: "cb", description: "test", seconds: 30, renew: false))
        try b.cluster.blocklist(address: addressA, seconds: 600)
        // The OSD learns the new map asynchronously: B's next op on the object carries it, so from then on the
        // OSD refuses A's ops there, and A's client, once it sees itself blocklisted, fails every call with
        // ESHUTDOWN. A few milliseconds here; the bound only catches a fence that never takes.
        _ = try b.xattr(object: object, name: "imgconv.builder")
        var fenced: CephError?
        let deadline = Date().addingTimeInterval(10)
        while fenced == nil, Date() < deadline {
            do {
                _ = try a.xattr(object: object, name: "imgconv.builder")
                Thread.sleep(forTimeInterval: 0.02)
            } catch let e as CephError {
                fenced = e
            }
        }
        #expect(fenced?.errno == ESHUTDOWN, "a fenced client could still read: \(String(describing: fenced))")
        #expect(throws: CephError.self) { _ = try a.listImages() }
        #expect(try b.guardedSetXattr(object: object, lock: "build", cookie: "cb", name: "imgconv.builder", value: nil))
        #expect(try b.xattr(object: object, name: "imgconv.builder") == nil)
        try b.releaseLease(object: object, name: "build", cookie: "cb")
    }

    @Test func unreachableClusterFailsWithinTheTimeout() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(Ceph.uniqueName("dead-ceph")).path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Nobody listens on port 1: the same cluster's keys, but a mon that does not answer.
        let conf = try String(contentsOfFile: Ceph.confPath, encoding: .utf8)
            .replacingOccurrences(of: #"mon host = .*"#, with: "mon host = 127.0.0.1:1", options: .regularExpression)
        try conf.write(toFile: dir + "/ceph.conf", atomically: true, encoding: .utf8)
        let start = Date()
        let e = #expect(throws: CephError.self) {
            _ = try RadosCluster(CephConfiguration(confPath: dir + "/ceph.conf", user: "imgconv",
                                                   keyring: Ceph.env["CEPH_USER_KEYRING"], timeout: 3))
        }
        let took = Date().timeIntervalSince(start)
        #expect(took < 20, "took \(took) s with a 3 s timeout (without it librados waits minutes)")
        #expect(e?.operation.hasPrefix("rados_connect") == true)
        #expect(e?.description.contains("did not answer in time") == true || e?.errnoName != "ETIMEDOUT")
    }
}
