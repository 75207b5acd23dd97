import AsyncHTTPClient
import Crypto
import Foundation
import Testing
@testable import Glance

@Suite("glance client units")
struct GlanceUnitTests {
    @Test func digestsMatchKnownVectors() {
        let abc = Array("abc".utf8)
        let expected = [
            "md5": "900150983cd24fb0d6963f7d28e17f72",
            "sha1": "a9993e364706816aba3e25717850c26c9cd0d89d",
            "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha512": "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        ]
        for (algo, want) in expected {
            var d = ImageDigest(algorithm: algo.uppercased())!
            abc.withUnsafeBytes { d.update(UnsafeRawBufferPointer(rebasing: $0[0..<1])) }
            abc.withUnsafeBytes { d.update(UnsafeRawBufferPointer(rebasing: $0[1..<3])) }
            #expect(d.hex() == want, "\(algo)")
        }
        #expect(ImageDigest(algorithm: "crc32") == nil)
    }

    /// libcrypto's digests over many blocks of uneven size agree with swift-crypto's (an independent
    /// implementation), and reading the hex does not end the digest.
    @Test func digestsAgreeWithSwiftCryptoOverManyBlocks() {
        var rng = SystemRandomNumberGenerator()
        let data = (0..<(9 << 20) + 3).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let oracles: [String: (Data) -> String] = [
            "md5": { ImageDigest.hex(Insecure.MD5.hash(data: $0)) },
            "sha1": { ImageDigest.hex(Insecure.SHA1.hash(data: $0)) },
            "sha256": { ImageDigest.hex(SHA256.hash(data: $0)) },
            "sha384": { ImageDigest.hex(SHA384.hash(data: $0)) },
            "sha512": { ImageDigest.hex(SHA512.hash(data: $0)) },
        ]
        for (algo, oracle) in oracles {
            var d = ImageDigest(algorithm: algo)!
            var at = 0
            let half = data.count / 2
            data.withUnsafeBytes { all in
                while at < half {
                    let n = min(half - at, 1 + Int.random(in: 0..<(1 << 20), using: &rng))
                    d.update(UnsafeRawBufferPointer(rebasing: all[at..<(at + n)]))
                    at += n
                }
            }
            #expect(d.hex() == oracle(Data(data[..<half])), "\(algo), first half")
            data.withUnsafeBytes { d.update(UnsafeRawBufferPointer(rebasing: $0[half...])) }
            #expect(d.hex() == oracle(Data(data)), "\(algo), all")
        }
    }

    @Test func verifiesTheMultihashAndMD5OnlyWithoutIt() throws {
        let glance = GlanceClient(http: HTTPClient.shared, endpoint: GlanceEndpoint(apiServers: ["http://127.0.0.1:1"], auth: nil))
        func expected(_ image: GlanceImage, verify: Bool = true) throws -> [String] {
            try VerifiedDownload(client: glance, image: image, verify: verify).expectations().map { "\($0.0)=\($0.1 ?? "-")" }
        }
        let both = GlanceImage(id: "i", checksum: "AB", osHashAlgo: "SHA512", osHashValue: "CD")
        #expect(try expected(both) == ["sha512=cd"])
        #expect(try expected(GlanceImage(id: "i", checksum: "AB")) == ["md5=ab"])
        #expect(try expected(GlanceImage(id: "i", checksum: "ab", osHashAlgo: "sha512", osHashValue: "")) == ["md5=ab"])
        #expect(try expected(both, verify: false) == ["sha512=-"])
        #expect(throws: GlanceError.self) { try expected(GlanceImage(id: "i")) }
        #expect(throws: GlanceError.self) { try expected(GlanceImage(id: "i", checksum: "ab", osHashAlgo: "whirlpool", osHashValue: "cd")) }
    }

    @Test func parsesAnImageRecord() throws {
        let json = """
        {"id":"198f71f9-53e4-45b9-916d-5ea25ee3abf2","name":"cirros","status":"active","disk_format":"qcow2",
         "container_format":"bare","size":4390912,"virtual_size":4000256,"checksum":"0f0b55cef0a55727439d332bab8e0fcc",
         "os_hash_algo":"sha512","os_hash_value":"c83a","tags":["golden"],"agent_cache":"True","min_disk":1,
         "locations":[{"url":"rbd://fsid/images/198f71f9-53e4-45b9-916d-5ea25ee3abf2/snap","metadata":{}}],
         "direct_url":"rbd://fsid/images/198f71f9-53e4-45b9-916d-5ea25ee3abf2/snap","hw_disk_bus":"virtio","protected":false}
        """
        let o = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        let i = try GlanceImage(json: o)
        #expect(i.id == "198f71f9-53e4-45b9-916d-5ea25ee3abf2")
        #expect(i.size == 4390912 && i.virtualSize == 4000256)
        #expect(i.diskFormat == "qcow2" && i.osHashAlgo == "sha512")
        #expect(i.tags == ["golden"])
        #expect(i.locations == ["rbd://fsid/images/198f71f9-53e4-45b9-916d-5ea25ee3abf2/snap"])
        #expect(i.properties == ["agent_cache": "True", "hw_disk_bus": "virtio"])
        #expect(i.propertyIsTrue("agent_cache"))
        #expect(!i.propertyIsTrue("hw_disk_bus"))
        #expect(throws: GlanceError.self) { try GlanceImage(json: ["name": "no id"]) }
    }

    /// Multi-store Glance writes `stores` and the copy-image status as comma-separated strings at the top level
    /// of the image (Nova looks for lists elsewhere and never sees a failure).
    @Test func parsesStoresAndImportStatus() throws {
        let json = """
        {"id":"198f71f9-53e4-45b9-916d-5ea25ee3abf2","status":"active","stores":"file1,ceph1",
         "os_glance_importing_to_stores":"s3rgw","os_glance_failed_import":"web, nope",
         "locations":[{"url":"file:///g/198f71f9-53e4-45b9-916d-5ea25ee3abf2","metadata":{"store":"file1"}},
                      {"url":"rbd://fsid/images/198f71f9-53e4-45b9-916d-5ea25ee3abf2/snap","metadata":{"store":"ceph1"}}]}
        """
        let i = try GlanceImage(json: try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any])
        #expect(i.stores == ["file1", "ceph1"])
        #expect(i.importingToStores == ["s3rgw"])
        #expect(i.failedImportStores == ["web", "nope"])
        #expect(i.locationStores["rbd://fsid/images/198f71f9-53e4-45b9-916d-5ea25ee3abf2/snap"] == "ceph1")
        let done = try GlanceImage(json: ["id": "i", "stores": "file1,ceph1", "os_glance_importing_to_stores": "", "os_glance_failed_import": ""])
        #expect(done.importingToStores.isEmpty && done.failedImportStores.isEmpty)
        #expect(try GlanceImage(json: ["id": "i"]).stores.isEmpty)
        #expect(GlanceImage.storeList(["a", " b "]) == ["a", "b"])
    }

    @Test func imageIDsAreUUIDsOnly() {
        #expect(ImageID.isValid("198f71f9-53e4-45b9-916d-5ea25ee3abf2"))
        #expect(ImageID.isValid("198F71F9-53E4-45B9-916D-5EA25EE3ABF2"))
        for bad in ["", "../etc/passwd", "198f71f9-53e4-45b9-916d-5ea25ee3abf", "198f71f9053e4-45b9-916d-5ea25ee3abf2",
                    "198f71f9-53e4-45b9-916d-5ea25ee3abg2", "198f71f9-53e4-45b9-916d-5ea25ee3abf2/"] {
            #expect(!ImageID.isValid(bad), "\(bad)")
        }
    }

    @Test func contentRangeAndDates() {
        #expect(VerifiedDownload.rangeStart("bytes 1000-4390911/4390912") == 1000)
        #expect(VerifiedDownload.rangeStart("bytes 0-99/*") == 0)
        #expect(VerifiedDownload.rangeStart("items 0-1/2") == nil)
        let d = KeystoneAuth.parseDate("2026-11-22T06:48:00.000000Z")
        #expect(d == ISO8601DateFormatter().date(from: "2026-11-22T06:48:00Z"))
        #expect(KeystoneAuth.parseDate("2026-11-22T06:48:00Z") != nil)
        #expect(KeystoneAuth.parseDate("tomorrow") == nil)
    }

    @Test func backoffGrowsAndIsCapped() {
        let p = RetryPolicy(attempts: 5, baseDelay: 0.5, maxDelay: 4)
        #expect([1, 2, 3, 4, 5].map(p.delay) == [0.5, 1, 2, 4, 4])
    }
}
