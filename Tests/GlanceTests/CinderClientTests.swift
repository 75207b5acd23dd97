import Foundation
import Testing
@testable import Glance

/// What the cinder-clone path reads from Cinder's API, parsed from the shapes Cinder 29 answers.
@Suite("cinder client units")
struct CinderClientTests {
    @Test func aVolumeAndItsBackEnd() throws {
        let v = try CinderVolume(json: [
            "id": "47003d95-54af-4c3c-867b-f039fe11ab79", "status": "available", "name": "image-28f2f271-552c-43fb-8dd8-a809c7e94033",
            "volume_type": "glance-fast", "os-vol-host-attr:host": "imgconvtest@rbd-fast#rbd-fast",
            "metadata": ["glance_image_id": "28f2f271-552c-43fb-8dd8-a809c7e94033", "readonly": "True"],
        ])
        #expect(v.backend == "rbd-fast" && v.volumeType == "glance-fast")
        #expect(v.metadata["glance_image_id"] == "28f2f271-552c-43fb-8dd8-a809c7e94033")
        // A member sees no host attribute: no back end.
        let member = try CinderVolume(json: ["id": "47003d95-54af-4c3c-867b-f039fe11ab79", "status": "available"])
        #expect(member.host == nil && member.backend == nil)
        #expect(throws: GlanceError.self) { try CinderVolume(json: ["status": "available"]) }
    }

    @Test func theRBDPoolOfABackEnd() {
        let fsid = "010cf71b-8fc6-43b4-9786-d384c582c263"
        let rbd = CinderPool(name: "h@rbd-fast#rbd-fast", volumeBackendName: "rbd-fast", storageProtocol: "ceph",
                             locationInfo: "ceph:/etc/ceph/ceph.conf:\(fsid):cinder:volumes-fast")
        #expect(rbd.rbd?.fsid == fsid && rbd.rbd?.pool == "volumes-fast")
        // A ceph.conf path with a colon in it: the fields are taken from the end.
        let colon = CinderPool(name: "h@b#b", volumeBackendName: "b", storageProtocol: "ceph",
                               locationInfo: "ceph:/etc/ce:ph/ceph.conf:\(fsid):cinder:volumes")
        #expect(colon.rbd?.fsid == fsid && colon.rbd?.pool == "volumes")
        // Another driver, or a malformed location_info: not an RBD pool.
        #expect(CinderPool(name: "h@lvm#lvm", volumeBackendName: "lvm", storageProtocol: "iSCSI", locationInfo: "LVMVolumeDriver:h:vg:thin:0").rbd == nil)
        #expect(CinderPool(name: "h@b#b", volumeBackendName: "b", storageProtocol: "ceph", locationInfo: "ceph:conf:fsid").rbd == nil)
        #expect(CinderPool(name: "h@b#b", volumeBackendName: "b", storageProtocol: "ceph", locationInfo: nil).rbd == nil)
    }
}
