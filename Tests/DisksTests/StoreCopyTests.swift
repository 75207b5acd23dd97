import CephFixture
@testable import Disks
import Foundation
import Glance
import Logging
import OpenStackFixture
import Testing

/// The copy-to-store path's corner that agents reach only in a race: Glance already holds the copy, so the
/// import answers 400 "already present", which counts as a copy.
@Suite("copy to store", .enabled(if: Ceph.available && OpenStack.available && OpenStack.rbdStore != nil))
struct StoreCopyTests {
    @Test func alreadyPresentCountsAsCopied() async throws {
        let rbd = try #require(OpenStack.rbdStore)
        let dir = try temporaryDirectory("copy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let id = try await OpenStack.createImage(OpenStack.testBytes(1 << 20, seed: 74), diskFormat: "raw", name: "copy-present",
                                                 store: "file1")["id"] as! String
        defer { Task { await OpenStack.deleteImage(id) } }
        let client = glanceSource().client
        let before = try await client.show(id)
        #expect(before.stores == ["file1"])
        // Someone else's copy finishes first.
        #expect(try await client.copyImage(id, to: [rbd]) == .accepted)
        for _ in 0..<300 where try await !client.show(id).stores.contains(rbd) { try await Task.sleep(for: .milliseconds(100)) }
        #expect(try await client.copyImage(id, to: [rbd]) == .alreadyPresent)

        // The agent still holds the image as it was before the copy: its own import is refused as already done.
        let (_, backend) = try node(dir)
        let copier = StoreCopier(pool: backend.pool, store: rbd, timeout: 60, logger: Logger(label: "test"))
        let outcome = await copier.copy(before, glance: client)
        let fsid = try await backend.fsid()
        #expect(outcome == .copied(GlanceRBDLocation("rbd://\(fsid)/images/\(id)/snap")!))
    }
}
