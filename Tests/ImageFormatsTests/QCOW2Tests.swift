import Foundation
import Testing
@testable import ImageFormats

/// Hostile and corrupt qcow2 images, made by patching a good sample in memory.
@Suite("qcow2")
struct QCOW2Tests {
    let good = Samples.bytes("qcow2-v3.qcow2")
    var l1Offset: Int { Int(good.be64(40)) }
    var firstL2: Int { Int(good.be64(l1Offset) & QCOW2Image.l1OffsetMask) }

    func patched(_ f: (inout [UInt8]) -> Void) -> [UInt8] {
        var b = good
        f(&b)
        return b
    }

    @Test func headerFieldsAreValidated() {
        #expect(imageError { _ = try openMemory(patched { $0.putBE32(20, 22) }) }
            == .invalidField(format: .qcow2, field: "cluster_bits", value: "22", reason: "must be between 9 and 21 (512 B to 2 MiB)"))
        #expect(imageError { _ = try openMemory(patched { $0.putBE32(20, 8) }) } != nil)
        #expect(imageError { _ = try openMemory(patched { $0.putBE32(4, 1) }) } == .unsupportedFormat(.qcow, declared: nil))
        #expect(imageError { _ = try openMemory(patched { $0.putBE32(4, 1) }, .qcow2) } == .unsupportedFormat(.qcow, declared: .qcow2))
        #expect(imageError { _ = try openMemory(patched { $0.putBE32(4, 4) }) } != nil)
        #expect(imageError { _ = try openMemory(patched { $0.putBE64(72, 1 << 10) }) }
            == .unsupported(format: .qcow2, feature: "unknown incompatible feature bits 0x400"))
        #expect(imageError { _ = try openMemory(patched { $0.putBE32(96, 7) }) }
            == .invalidField(format: .qcow2, field: "refcount_order", value: "7", reason: "must be at most 6 (64-bit refcounts)"))
        #expect(imageError { _ = try openMemory(patched { $0.putBE64(24, 65 << 40) }) }
            == .limitExceeded(format: .qcow2, field: "size", value: 65 << 40, limit: 64 << 40))
    }

    @Test func tableSizesAreCheckedBeforeAllocation() {
        // A forged L1 size of 2^28 entries (2 GiB) is refused by the hard limit, not allocated.
        if case .limitExceeded(_, let field, _, _) = imageError({ _ = try openMemory(patched { $0.putBE32(36, 1 << 28) }) }) {
            #expect(field == "l1_size")
        } else { Issue.record("expected limitExceeded") }
        // An L1 table past the end of the file.
        let e = imageError { _ = try openMemory(patched { $0.putBE64(40, 1 << 40) }) }
        if case .pastEndOfFile(let what, _, _, _) = e { #expect(what == "qcow2 L1 table") } else { Issue.record("got \(String(describing: e))") }
        // A virtual size the L1 table is too small for.
        #expect(imageError { _ = try openMemory(patched { $0.putBE64(24, 1 << 40) }) } != nil)
        // A refcount table bigger than the file.
        let e2 = imageError { _ = try openMemory(patched { $0.putBE32(56, 1 << 20) }) }
        #expect(e2 != nil)
    }

    @Test func pointerPastEndOfFileIsAnErrorNotZeros() throws {
        let b = patched { b in
            let l2 = Int(b.be64(Int(b.be64(40))) & QCOW2Image.l1OffsetMask)
            b.putBE64(l2, (1 << 63) | (1 << 36))  // data cluster at 64 GiB
        }
        let image = try openMemory(b)
        var buf = [UInt8](repeating: 0, count: 4096)
        let e = imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }
        if case .pastEndOfFile = e {} else { Issue.record("got \(String(describing: e))") }
        #expect(imageError { _ = try image.allExtents() } != nil)
        // check reports it as corruption (exit 2).
        #expect(try image.check().exitCode == 2)
    }

    @Test func unalignedL2PointerIsRefused() throws {
        let b = patched { b in
            let l1 = Int(b.be64(40))
            b.putBE64(l1, b.be64(l1) + 512)
        }
        let image = try openMemory(b)
        var buf = [UInt8](repeating: 0, count: 512)
        #expect(imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } } != nil)
    }

    @Test func encryptionIsReportedAndRefused() throws {
        let image = try openMemory(patched { $0.putBE32(32, 2) })
        #expect(image.info().encrypted)
        #expect(image.info().json["encrypted"] == .bool(true))
        var buf = [UInt8](repeating: 0, count: 512)
        #expect(imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }
            == .unsupported(format: .qcow2, feature: "encryption (LUKS)"))
    }

    @Test func backingFileIsReportedNeverOpened() throws {
        let name = "../../../../etc/passwd"
        let image = try openMemory(patched { b in
            b.replaceSubrange(2048..<(2048 + name.utf8.count), with: Array(name.utf8))
            b.putBE64(8, 2048)
            b.putBE32(16, UInt32(name.utf8.count))
        })
        let q = image as! QCOW2Image
        #expect(q.backingFile == name)
        #expect(image.info().json["backing-filename"] == .string(name))
        // Unallocated clusters read as zeros: nothing of the named file is read.
        let data = try readAll(image)
        #expect(matchesBase(data))
    }

    @Test func externalDataFileIsReportedNeverOpened() throws {
        let image = try openMemory(patched { b in
            b.putBE64(72, b.be64(72) | QCOW2Image.dataFileBit)
        })
        #expect(image.info().json["format-specific"]?["data"]?["data-file"] == .string(""))
        var buf = [UInt8](repeating: 0, count: 512)
        let e = imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }
        if case .externalFile(_, let kind, _) = e { #expect(kind == "an external data file") } else { Issue.record("got \(String(describing: e))") }
    }

    @Test func corruptCompressedClusterFailsClearly() throws {
        var b = Samples.bytes("qcow2-zlib.qcow2")
        let l1 = Int(b.be64(40))
        let l2 = Int(b.be64(l1) & QCOW2Image.l1OffsetMask)
        let entry = b.be64(l2)
        #expect(entry & QCOW2Image.compressedFlag != 0)
        let host = Int(entry & ((1 << 54) - 1))
        for i in 0..<64 { b[host + i] = 0xff }
        let image = try openMemory(b)
        var buf = [UInt8](repeating: 0, count: 512)
        let e = imageError { try buf.withUnsafeMutableBytes { try image.read(into: $0, at: 0) } }
        if case .decompression(let f, let off, _) = e { #expect(f == .qcow2 && off == UInt64(host)) } else { Issue.record("got \(String(describing: e))") }
    }

    @Test func checkFindsLeaksAndCorruptions() throws {
        let image = try openMemory(good)
        let clean = try image.check()
        #expect(clean.exitCode == 0)
        // Leak: a refcount for a cluster past everything in use.
        let rt = Int(good.be64(48))
        let rb = Int(good.be64(rt))
        let end = Int(clean.imageEndOffset! / 65536)
        var leaky = good + [UInt8](repeating: 0, count: 65536)
        leaky[rb + end * 2 + 1] = 1
        let r1 = try openMemory(leaky).check()
        #expect(r1.leaks == 1 && r1.corruptions == 0 && r1.exitCode == 3)
        // Corruption: the refcount of the L1 table's cluster dropped to zero.
        var broken = good
        broken[rb + l1Offset / 65536 * 2 + 1] = 0
        let r2 = try openMemory(broken).check()
        #expect(r2.corruptions >= 1 && r2.exitCode == 2)
        #expect(r2.json["corruptions"] != nil)
    }

    @Test func snapshotsAreListedNotRead() throws {
        let image = try ImageOpener.open(path: Samples.path("qcow2-snapshot.qcow2")) as! QCOW2Image
        #expect(image.snapshots.map(\.info.name) == ["before-update"])
        #expect(image.snapshots.map(\.info.id) == ["1"])
        // Reads see the current disk, not the snapshot.
        var expected = Samples.base
        for i in 0..<4096 { expected[i] = 0x99 }
        #expect(try readAll(image) == expected)
        // Clusters shared with the snapshot have refcount 2 and no COPIED flag: still a clean check.
        #expect(try image.check().exitCode == 0)
    }
}
