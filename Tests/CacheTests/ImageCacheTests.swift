import Crypto
import Foundation
import Glance
import ImageFixture
import ImageFormats
import Testing
@testable import Cache

@Suite("image cache")
struct ImageCacheTests {
    func makeCache(_ dir: String, source: FakeSource, maxSize: UInt64 = 1 << 30, forceRaw: Bool = false,
                   layout: CacheConfig.Layout = .nova) throws -> ImageCache {
        try ImageCache(config: CacheConfig(directory: dir, maxSize: maxSize, layout: layout, forceRaw: forceRaw), source: source)
    }

    @Test func fiftyConcurrentRequestsMakeOneDownload() async throws {
        let dir = try temporaryDirectory("flight")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource(delayPerBlock: 2_000_000)
        let bytes = pseudoRandom(2 << 20, seed: 7)
        let id = source.add(bytes)
        let cache = try makeCache(dir, source: source)
        let paths = try await withThrowingTaskGroup(of: String.self) { g in
            for _ in 0..<50 { g.addTask { try await cache.fetch(id).path ?? "" } }
            return try await g.reduce(into: [String]()) { $0.append($1) }
        }
        #expect(source.downloads.load(ordering: .relaxed) == 1)
        #expect(source.shows.load(ordering: .relaxed) < 50)
        #expect(Set(paths).count == 1)
        #expect(FileManager.default.contents(atPath: paths[0]) == Data(bytes))
        // Nova's _base names files sha1(image id).
        #expect(paths[0].hasSuffix("/" + CacheConfig(directory: dir).fileName(for: id)))
        #expect(paths[0].split(separator: "/").last!.count == 40)
        // A later request is a hit and downloads nothing.
        _ = try await cache.fetch(id)
        #expect(source.downloads.load(ordering: .relaxed) == 1)
        #expect(await cache.metrics.hits >= 1)
    }

    @Test func evictsLeastRecentlyUsedButNeverPinnedOrInUse() async throws {
        let dir = try temporaryDirectory("lru")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let mib = 1 << 20
        let a = source.add(pseudoRandom(mib, seed: 1)), b = source.add(pseudoRandom(mib, seed: 2))
        let c = source.add(pseudoRandom(mib, seed: 3)), d = source.add(pseudoRandom(mib, seed: 4))
        let e = source.add(pseudoRandom(mib, seed: 5))
        let cache = try makeCache(dir, source: source, maxSize: UInt64(3 * mib + mib / 2), layout: .id)
        for id in [a, b, c] { _ = try await cache.fetch(id) }
        try await Task.sleep(nanoseconds: 10_000_000)
        _ = try await cache.fetch(a)                  // a is now the most recently used
        _ = try await cache.setPinned(b, true)        // b is the least recently used but pinned
        _ = try await cache.fetch(d)                  // needs room: c goes (LRU among unpinned)
        #expect(try await cache.image(c) == nil)
        #expect(try await cache.image(b)?.state == .ready)
        #expect(cacheFiles(dir) == [a, b, d].sorted())
        // With a in use and b pinned, e evicts d; then nothing is left to evict.
        _ = try await cache.acquire(a)
        _ = try await cache.fetch(e)
        #expect(cacheFiles(dir) == [a, b, e].sorted())
        _ = try await cache.setPinned(e, true)
        await #expect(throws: CacheError.self) { try await cache.fetch(c) }
        do {
            _ = try await cache.fetch(c)
        } catch let err as CacheError {
            guard case .noRoom = err else { Issue.record("expected noRoom, got \(err)"); return }
            #expect(err.description.contains("max_size"))
        }
        #expect(cacheFiles(dir) == [a, b, e].sorted())
        await #expect(throws: CacheError.busy(id: a, why: "in use")) { try await cache.evict(a) }
        await #expect(throws: CacheError.busy(id: b, why: "pinned (unpin it first)")) { try await cache.evict(b) }
        await cache.release(a)
        try await cache.evict(a)
        #expect(cacheFiles(dir) == [b, e].sorted())
        #expect(try await cache.usedBytes() == UInt64(2 * mib))
    }

    @Test func corruptDownloadLeavesNothing() async throws {
        let dir = try temporaryDirectory("corrupt")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let id = source.add(pseudoRandom(300_000, seed: 9), corruptAfterHash: true)
        let cache = try makeCache(dir, source: source)
        await #expect(throws: CacheError.self) { try await cache.fetch(id) }
        #expect(cacheFiles(dir) == [])
        let row = try await cache.image(id)
        #expect(row?.state == .error)
        #expect(row?.error?.contains("sha512") == true)
        #expect(await cache.allJobs().last?.state == .error)
    }

    @Test func hostileImagesAreRefusedAndNeverReady() async throws {
        let dir = try temporaryDirectory("hostile")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let qcow2 = [UInt8](FileManager.default.contents(atPath: samples + "/qcow2-v3.qcow2")!)
        // A qcow2 registered as raw (CVE-2024-40767): refused by the first block's check.
        let asRaw = source.add(qcow2, diskFormat: "raw")
        // Random bytes registered as qcow2.
        let notQcow = source.add(pseudoRandom(200_000, seed: 3), diskFormat: "qcow2")
        // A qcow2 with a backing file pointing at a host file: passes the prefix check, refused by the full inspection.
        var backed = qcow2
        let name = Array("/etc/passwd".utf8)
        for i in 0..<8 { backed[8 + i] = UInt8(truncatingIfNeeded: UInt64(0xF00) >> (56 - 8 * i)) }
        for i in 0..<4 { backed[16 + i] = UInt8(truncatingIfNeeded: UInt32(name.count) >> (24 - 8 * i)) }
        backed.replaceSubrange(0xF00..<0xF00 + name.count, with: name)
        let withBacking = source.add(backed, diskFormat: "qcow2")
        let unsupported = source.add([1, 2, 3], diskFormat: "vhdx")
        let cache = try makeCache(dir, source: source)
        for (id, needle) in [(asRaw, "format-mismatch"), (notQcow, "format-mismatch"), (withBacking, "backing")] {
            do {
                _ = try await cache.fetch(id)
                Issue.record("\(id) was cached")
            } catch let e as CacheError {
                guard case let .unsafe(_, reasons) = e else { Issue.record("\(e)"); continue }
                #expect(reasons.joined().contains(needle), "\(reasons)")
            }
            #expect(try await cache.image(id)?.state == .error)
        }
        await #expect(throws: CacheError.unsupportedFormat(id: unsupported, diskFormat: "vhdx", containerFormat: "bare")) {
            try await cache.fetch(unsupported)
        }
        #expect(cacheFiles(dir) == [])
        #expect(await cache.metrics.errors["unsafe"] == 3)
    }

    @Test func forceRawConvertsOnArrival() async throws {
        let dir = try temporaryDirectory("forceraw")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let id = source.add([UInt8](FileManager.default.contents(atPath: samples + "/qcow2-zlib.qcow2")!), diskFormat: "qcow2")
        let cache = try makeCache(dir, source: source, forceRaw: true)
        let row = try await cache.fetch(id)
        #expect(row.storedFormat == "raw")
        #expect(row.diskFormat == "qcow2")
        #expect(FileManager.default.contents(atPath: row.path!) == FileManager.default.contents(atPath: samples + "/base.raw"))
        #expect(cacheFiles(dir).count == 1)
        // The raw file is sparse: it occupies less than its size.
        #expect(row.diskBytes < row.virtualSize!)
    }

    @Test func startupRemovesOrphansAndInterruptedRows() async throws {
        let dir = try temporaryDirectory("reconcile")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let good = source.add(pseudoRandom(100_000, seed: 1))
        let gone = source.add(pseudoRandom(100_000, seed: 2))
        do {
            let cache = try makeCache(dir, source: source, layout: .id)
            _ = try await cache.fetch(good)
            _ = try await cache.fetch(gone)
        }
        // What a kill -9 leaves: a temporary file, a row stuck in fetching, and a file deleted behind our back.
        let config = CacheConfig(directory: dir, layout: .id)
        FileManager.default.createFile(atPath: dir + "/.\(UUID().uuidString.lowercased()).imgconv-4242-0", contents: Data([1, 2, 3]))
        let index = try CacheIndex(path: config.indexPath)
        var stuck = CachedImage(id: UUID().uuidString.lowercased(), diskFormat: "raw", state: .fetching)
        stuck.bytesDone = 42
        try index.save(stuck)
        try FileManager.default.removeItem(atPath: dir + "/" + gone)
        let cache = try makeCache(dir, source: source, layout: .id)
        #expect(cacheFiles(dir) == [good])
        #expect(try await cache.images().map(\.id) == [good])
        // The lost image is fetched again on demand.
        _ = try await cache.fetch(gone)
        #expect(cacheFiles(dir) == [good, gone].sorted())
    }

    @Test func scrubFindsAFileChangedOnDisk() async throws {
        let dir = try temporaryDirectory("scrub")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let id = source.add(pseudoRandom(500_000, seed: 4))
        let cache = try makeCache(dir, source: source)
        let row = try await cache.fetch(id)
        #expect(try await cache.scrub().allSatisfy(\.ok))
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: row.path!))
        try h.seek(toOffset: 1000)
        h.write(Data([0x42]))
        try h.close()
        let r = try await cache.scrub([id])
        #expect(r.count == 1 && !r[0].ok)
        #expect(!FileManager.default.fileExists(atPath: row.path!))
        #expect(try await cache.image(id)?.state == .error)
    }

    /// Nova's image cache manager (or an operator) deletes a cached file: the next use notices it and fetches
    /// again; the periodic check marks every such image `missing` (out of the size accounting) and fetches the
    /// pinned ones again at once; a pinned image whose file went while the agent was stopped stays known.
    @Test func filesDeletedBehindTheCachesBackAreNoticedAndFetchedAgain() async throws {
        let dir = try temporaryDirectory("missing")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let pinned = source.add(pseudoRandom(300_000, seed: 21)), plain = source.add(pseudoRandom(200_000, seed: 22))
        let used = source.add(pseudoRandom(100_000, seed: 23))
        do {
            let cache = try makeCache(dir, source: source)
            var paths: [String: String] = [:]
            for id in [pinned, plain, used] { paths[id] = try await cache.fetch(id).path! }
            _ = try await cache.setPinned(pinned, true)
            #expect(source.downloads.load(ordering: .relaxed) == 3)

            // On use: a hit whose file is gone is fetched again, not served.
            try FileManager.default.removeItem(atPath: paths[used]!)
            let again = try await cache.fetch(used)
            #expect(again.state == .ready && FileManager.default.fileExists(atPath: again.path!))
            #expect(source.downloads.load(ordering: .relaxed) == 4)

            // The periodic check.
            for id in [pinned, plain] { try FileManager.default.removeItem(atPath: paths[id]!) }
            let before = cache.usedBytes()
            let gone = await cache.checkFilesAndRestorePinned()
            #expect(Set(gone) == [pinned, plain])
            let missing = try #require(try await cache.image(plain))
            #expect(missing.state == .missing && missing.path == nil && missing.diskBytes == 0, "\(missing)")
            #expect((missing.error ?? "").contains("disappeared"))
            #expect(cache.usedBytes() < before)
            let restored = try await cache.fetch(pinned)   // joins the fetch the check started
            #expect(restored.pinned && FileManager.default.contents(atPath: restored.path!) != nil)
            #expect(source.downloads.load(ordering: .relaxed) == 5)
            #expect(await cache.checkFiles().isEmpty)
            // The unpinned one comes back when asked for (prefetch asks every pass).
            #expect(try await cache.fetch(plain).state == .ready)
            #expect(source.downloads.load(ordering: .relaxed) == 6)
            await cache.shutdown()
        }
        // Stopped, and both files deleted: the pinned image stays (missing, to fetch again), the other is dropped.
        for name in try FileManager.default.contentsOfDirectory(atPath: dir) where name.count == 40 {
            try FileManager.default.removeItem(atPath: dir + "/" + name)
        }
        let cache = try makeCache(dir, source: source)
        #expect(try await cache.image(pinned)?.state == .missing)
        #expect(try await cache.image(pinned)?.pinned == true)
        #expect(try await cache.image(plain) == nil)
        _ = await cache.checkFilesAndRestorePinned()
        #expect(try await cache.fetch(pinned).state == .ready)
        await cache.shutdown()
    }

    @Test func malformedIDsNeverReachAPath() async throws {
        let dir = try temporaryDirectory("ids")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cache = try makeCache(dir, source: FakeSource())
        for bad in ["../../etc/passwd", "", "x", "0000000-0000-0000-0000-0000000000000", "zzzzzzzz-0000-0000-0000-000000000000"] {
            await #expect(throws: CacheError.invalidID(bad)) { try await cache.fetch(bad) }
            await #expect(throws: CacheError.invalidID(bad)) { try await cache.evict(bad) }
        }
        await #expect(throws: CacheError.upstream(.imageNotFound("00000000-0000-0000-0000-000000000000"))) {
            try await cache.fetch("00000000-0000-0000-0000-000000000000")
        }
    }
}

/// Whether this machine lets us mount a tmpfs (root, not in a restricted container): CI does.
let canMountTmpfs: Bool = {
    guard getuid() == 0 else { return false }
    let dir = NSTemporaryDirectory() + "imgconv-mountprobe-\(UUID().uuidString.prefix(8))"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    func run(_ args: [String]) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }
    guard run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", dir]) else { return false }
    return run(["umount", dir])
}()

/// A full file system (a 2 MiB tmpfs) fails the fetch cleanly with nothing left behind.
@Suite("image cache on a full disk", .enabled(if: canMountTmpfs))
struct FullDiskTests {
    @Test func enospcFailsCleanly() async throws {
        let dir = try temporaryDirectory("enospc")
        let mountPoint = dir + "/small"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mountPoint]
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "mount tmpfs failed")
        defer {
            let u = Process()
            u.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            u.arguments = ["umount", mountPoint]
            try? u.run()
            u.waitUntilExit()
            try? FileManager.default.removeItem(atPath: dir)
        }
        let source = FakeSource()
        let small = source.add(pseudoRandom(256 << 10, seed: 1))
        let big = source.add(pseudoRandom(3 << 20, seed: 2))
        // The index lives elsewhere; max_size does not stop it: the disk does.
        let cache = try ImageCache(config: CacheConfig(directory: mountPoint, indexPath: dir + "/index.sqlite", maxSize: 1 << 30),
                                   source: source)
        _ = try await cache.fetch(small)
        do {
            _ = try await cache.fetch(big)
            Issue.record("a 3 MiB image fit on a 2 MiB file system")
        } catch let e as CacheError {
            guard case let .io(message) = e else { Issue.record("\(e)"); return }
            #expect(message.contains("ENOSPC") || message.contains("full"), "\(message)")
        }
        #expect(cacheFiles(mountPoint).count == 1, "only the first image: no partial file")
        #expect(try await cache.image(big)?.state == .error)
        #expect(try await cache.image(small)?.state == .ready)
    }
}

/// The pieces the cache is made of, and what the split fixed.
@Suite("image cache parts")
struct ImageCachePartsTests {
    func makeCache(_ dir: String, source: FakeSource, forceRaw: Bool = false) throws -> ImageCache {
        try ImageCache(config: CacheConfig(directory: dir, maxSize: 8 << 30, layout: .id, forceRaw: forceRaw), source: source)
    }

    /// Glance has no hash for the image (verify_hash off): the scrub compares with the sha512 the download
    /// recorded, and never deletes a good file for want of a hash.
    @Test func scrubUsesTheHashRecordedAtDownloadWhenGlanceHasNone() async throws {
        let dir = try temporaryDirectory("scrub-recorded")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let bytes = pseudoRandom(400_000, seed: 11)
        let id = source.add(bytes, withoutHashes: true)
        let cache = try makeCache(dir, source: source)
        let row = try await cache.fetch(id)
        #expect(row.recordedHashAlgo == "sha512")
        #expect(row.recordedHash == hex(SHA512.hash(data: bytes)))
        let clean = try await cache.scrub([id])
        #expect(clean.count == 1 && clean[0].ok, "\(clean)")
        #expect(clean.first?.detail.contains("the download recorded") == true)
        #expect(FileManager.default.fileExists(atPath: row.path!), "a good file survives the scrub")
        // Persisted: a new cache on the same index still knows the hash.
        await cache.flushIndex()
        let reopened = try makeCache(dir, source: source)
        #expect(try await reopened.image(id)?.recordedHash == row.recordedHash)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: row.path!))
        try h.seek(toOffset: 7)
        h.write(Data([0x42]))
        try h.close()
        let bad = try await reopened.scrub([id])
        #expect(bad.count == 1 && !bad[0].ok)
        try await Task.sleep(for: .milliseconds(50))
        #expect(!FileManager.default.fileExists(atPath: row.path!))
    }

    @Test func idsMustBeCanonical() async throws {
        let dir = try temporaryDirectory("canonical")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        let id = source.add(pseudoRandom(10_000, seed: 1))
        let cache = try makeCache(dir, source: source)
        // The edges normalise; inside, an upper-case id is a bug, refused before it names a file.
        await #expect(throws: CacheError.invalidID(id.uppercased())) { try await cache.fetch(id.uppercased()) }
        #expect(ImageID.normalized(id.uppercased()) == id)
        #expect(ImageID.normalized("not-a-uuid") == nil)
        _ = try await cache.fetch(ImageID.normalized(id.uppercased())!)
        #expect(cacheFiles(dir) == [id])
    }

    @Test func evictionPlanTakesLeastRecentlyUsedFirstAndStopsWhenItFits() {
        func row(_ n: Int, bytes: UInt64) -> CachedImage {
            var r = CachedImage(id: String(format: "00000000-0000-0000-0000-%012d", n), diskFormat: "raw", state: .ready)
            r.diskBytes = bytes
            return r
        }
        let rows = [row(1, bytes: 100), row(2, bytes: 300), row(3, bytes: 50)]
        let plan = EvictionPlan.make(needed: 350, alreadyReserved: 0, used: 450, reservedByOthers: 100, maxSize: 600,
                                     minFree: 0, freeBytes: nil, candidates: rows)
        #expect(plan?.victims.map(\.diskBytes) == [100, 300])
        #expect(EvictionPlan.make(needed: 10, alreadyReserved: 0, used: 450, reservedByOthers: 0, maxSize: 600,
                                  minFree: 0, freeBytes: nil, candidates: rows)?.victims == [])
        #expect(EvictionPlan.make(needed: 700, alreadyReserved: 0, used: 0, reservedByOthers: 0, maxSize: 600,
                                  minFree: 0, freeBytes: nil, candidates: rows) == nil)
        // min_free: 120 bytes free, 100 must stay free: 50 more bytes need 30 freed.
        #expect(EvictionPlan.make(needed: 50, alreadyReserved: 0, used: 0, reservedByOthers: 0, maxSize: 1 << 30,
                                  minFree: 100, freeBytes: 120, candidates: rows)?.victims.map(\.diskBytes) == [100])
    }

    /// Shutdown in the middle of a force_raw conversion: the conversion stops (the executor's token), and neither
    /// the download nor the half-written raw file stays.
    @Test func shutdownStopsAForceRawConversionAndLeavesNoFiles() async throws {
        let dir = try temporaryDirectory("cancel-raw")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = FakeSource()
        // A 2 GiB qcow2 that is all data (one pattern cluster, compressed, 32768 times): seconds of conversion.
        let qcow2 = CompressedQcow2.make(clusters: 32768)
        let id = source.add(qcow2, diskFormat: "qcow2")
        let cache = try makeCache(dir + "/cache", source: source, forceRaw: true)
        let fetch = Task { try await cache.fetch(id) }
        var converting = false
        for _ in 0..<600 where !converting {
            try await Task.sleep(for: .milliseconds(50))
            converting = cache.allJobs().last?.state == .converting
        }
        #expect(converting, "\(cache.allJobs())")
        try await Task.sleep(for: .milliseconds(200))
        let started = ContinuousClock.now
        await cache.shutdown()
        let took = started.duration(to: .now)
        #expect(took < .seconds(5), "shutdown took \(took)")
        await #expect(throws: CancellationError.self) { try await fetch.value }
        #expect(cacheFiles(dir + "/cache") == [], "\(cacheFiles(dir + "/cache"))")
        #expect(cache.allJobs().last?.state == .cancelled)
        #expect(try await cache.image(id) == nil)
    }
}

