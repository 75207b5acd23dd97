@testable import Disks
import Testing

/// `cinder://` locations as glance_store's cinder driver writes them.
@Suite("cinder locations")
struct CinderLocationTests {
    @Test func multiStoreAndSingleStoreForms() {
        let multi = GlanceCinderLocation("cinder://cinder-fast/47003D95-54AF-4C3C-867B-F039FE11AB79")
        #expect(multi?.store == "cinder-fast" && multi?.volumeID == "47003d95-54af-4c3c-867b-f039fe11ab79")
        let single = GlanceCinderLocation("cinder://47003d95-54af-4c3c-867b-f039fe11ab79")
        #expect(single?.store == nil && single?.volumeID == "47003d95-54af-4c3c-867b-f039fe11ab79")
        #expect(CinderVolumeImage(pool: "volumes-fast", volumeID: multi!.volumeID, via: "").description
                == "volumes-fast/volume-47003d95-54af-4c3c-867b-f039fe11ab79")
    }

    @Test func anythingElseIsNotACinderLocation() {
        for url in ["rbd://f/p/i/s", "cinder://", "cinder://store/", "cinder://a/b/c", "cinder://store/../../etc/passwd",
                    "cinder://store/not-a-uuid", "file:///var/lib/glance/images/x"] {
            #expect(GlanceCinderLocation(url) == nil, "\(url)")
        }
    }
}
