/// qemu-img check for qcow2: rebuild every cluster's reference count from the metadata (header, L1 and L2
/// tables, data clusters, refcount structures, snapshots, bitmaps) and compare it with the stored refcounts.
/// Stored < referenced is a corruption; stored > referenced is a leak.
///
/// Besides the counts, each host cluster gets a role (header, L1, L2, refcount, snapshot table, bitmap, data,
/// compressed). Metadata that shares a cluster with something of another role is an overlap, a structural error
/// that does not depend on the stored refcounts: when lazy refcounts left an image dirty its refcounts are stale
/// by design, so refcount mismatches (and the COPIED flags derived from them) are counted apart
/// (`CheckResult.refcountErrors`) and the inspection ignores them, but overlaps still make the image unsafe.
///
/// Memory is bounded whatever the file: the counters cover a window of `windowClusters` host clusters at a time
/// (5 bytes each: 10 MiB), and the whole walk runs once per window; L2 tables are read into a buffer, not the
/// image's cache.
struct QCOW2Checker {
    let image: QCOW2Image
    var result: CheckResult
    let fileClusters: Int
    /// The window: host clusters `[windowStart, windowEnd)`.
    var windowStart = 0
    var windowEnd = 0
    var computed: [UInt16] = []
    var stored: [UInt16] = []
    var roles: [Role] = []
    var firstPass: Bool { windowStart == 0 }
    /// After `HostRangeChecker.maxErrors` corruptions the walk stops: a hostile table buys no more time.
    var stopped: Bool { result.corruptions >= HostRangeChecker.maxErrors }
    var highest = -1
    /// The most host clusters one check will count (256 Mi clusters), and how many one pass counts.
    static let maxClusters = 1 << 28
    static let windowClusters = 2 << 20
    /// L2 entries left to walk in this pass. Legitimate images walk each L2 table once per L1 table that holds it
    /// (the active one and each snapshot's); forged ones can point thousands of L1 entries or snapshots at one
    /// table. The budget, 16 walks of every 8 bytes of the file (at least 1 Mi entries), bounds the time.
    var workLeft = 0
    var budget: Int
    var visitedL1: Set<UInt64> = []
    /// L2 tables already walked for the current L1 table: a bit per host cluster, with an epoch per word so a new
    /// L1 walk starts empty without clearing the map (forged L1 tables point millions of entries at one table).
    var l2Seen: [UInt64] = []
    var l2SeenEpoch: [UInt32] = []
    var epoch: UInt32 = 0

    /// What a host cluster holds. Data and compressed clusters may be shared (snapshots; compressed clusters
    /// packed together), L2 tables may be shared between L1 tables (snapshots); anything else sharing a cluster
    /// with a different role is an overlap.
    enum Role: UInt8 {
        case none, data, compressed, header, l1, l2, refcountTable, refcountBlock, snapshotTable, bitmap

        var name: String {
            switch self {
            case .none: return "nothing"
            case .data: return "a data cluster"
            case .compressed: return "a compressed cluster"
            case .header: return "the header"
            case .l1: return "an L1 table"
            case .l2: return "an L2 table"
            case .refcountTable: return "the refcount table"
            case .refcountBlock: return "a refcount block"
            case .snapshotTable: return "the snapshot table"
            case .bitmap: return "a bitmap structure"
            }
        }

        func mayShare(with other: Role) -> Bool {
            self == other && (self == .data || self == .compressed || self == .l2)
        }
    }

    init(image: QCOW2Image) {
        self.image = image
        result = CheckResult(filename: image.files[0].name, format: .qcow2)
        fileClusters = Int(divRoundUp(image.files[0].size, image.clusterSize))
        budget = max(1 << 20, Int(min(image.files[0].size / 8, UInt64(Int.max / 32))) * 16)
    }

    var cs: UInt64 { image.clusterSize }
    var fileSize: UInt64 { image.files[0].size }

    /// A problem that does not depend on the window: reported on the first pass only.
    mutating func corruption(_ message: @autoclosure () -> String) {
        if firstPass { result.corruption(message()) }
    }

    /// Counts one reference to every cluster in `offset ..< offset+length` that lies in the window.
    mutating func reference(_ role: Role, _ what: @autoclosure () -> String, offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        // A cluster counts as inside the file if any of it is: qemu extends a file only as far as it wrote
        // (extended L2 subclusters, the last compressed sector).
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || (end - 1) / cs >= UInt64(fileClusters) {
            let size = fileSize
            corruption("\(what()) at offset \(offset) (length \(length)) lies past the end of the file (\(size) bytes)")
            return
        }
        let first = max(Int(offset / cs), windowStart), last = min(Int((end - 1) / cs), windowEnd - 1)
        guard first <= last else { return }
        for c in first...last {
            let i = c - windowStart
            if computed[i] < UInt16.max { computed[i] += 1 }
            let had = roles[i]
            if had == .none {
                roles[i] = role
            } else if had != role || !role.mayShare(with: had) {
                result.corruption("\(what()) at offset \(offset) overlaps \(had.name) in cluster \(c)")
            }
        }
    }

    mutating func run() throws -> CheckResult {
        if fileClusters > Self.maxClusters {
            result.checkErrors += 1
            result.messages.append("the file has \(fileClusters) clusters, more than the \(Self.maxClusters) a check counts")
            return result
        }
        result.totalClusters = divRoundUp(image.virtualSize, cs)
        let words = (fileClusters + 63) / 64
        l2Seen = [UInt64](repeating: 0, count: words)
        l2SeenEpoch = [UInt32](repeating: 0, count: words)
        repeat {
            windowEnd = min(windowStart + Self.windowClusters, fileClusters)
            let n = windowEnd - windowStart
            computed = [UInt16](repeating: 0, count: n)
            stored = [UInt16](repeating: 0, count: n)
            roles = [Role](repeating: .none, count: n)
            workLeft = budget
            visitedL1 = []
            try pass()
            if stopped {
                result.checkErrors += 1
                result.messages.append("stopped after \(HostRangeChecker.maxErrors) errors: the image is corrupt or hostile")
                return result
            }
            if workLeft < 0 { return result }
            windowStart = windowEnd
        } while windowStart < fileClusters
        result.imageEndOffset = UInt64(highest + 1) * cs
        return result
    }

    /// One walk of every structure, counting the clusters in the window.
    mutating func pass() throws {
        reference(.header, "header", offset: 0, length: cs)
        // The stored refcounts first: the active L1 walk checks COPIED flags against them as it goes.
        try loadStoredRefcounts()
        try walkL1(image.l1, l1Offset: image.l1Offset, l1Bytes: UInt64(image.l1.count) * 8, label: "active", active: true)
        for s in image.snapshots where workLeft >= 0 && !stopped {
            guard s.l1Offset % cs == 0, UInt64(s.l1Size) * 8 <= QCOW2Image.maxL1Bytes else {
                corruption("snapshot \(s.info.id): L1 table at \(s.l1Offset) with \(s.l1Size) entries is invalid")
                continue
            }
            guard fits(s.l1Offset, UInt64(s.l1Size) * 8, in: fileSize) else {
                corruption("snapshot \(s.info.id): L1 table at \(s.l1Offset) lies past the end of the file")
                continue
            }
            let l1 = try OnDiskTable<UInt64>(storage: image.files[0], offset: s.l1Offset, count: Int(s.l1Size), bigEndian: true,
                                             what: "snapshot L1 table")
            try walkL1(l1, l1Offset: s.l1Offset, l1Bytes: UInt64(s.l1Size) * 8, label: "snapshot \(s.info.id)", active: false)
        }
        if !image.snapshots.isEmpty {
            reference(.snapshotTable, "snapshot table", offset: image.snapshotsOffset, length: image.snapshotsTableSize)
        }
        if workLeft < 0 || stopped { return }
        try walkBitmaps()
        compare()
    }

    /// References an L1 table, its L2 tables and their clusters. The active table also fills the allocation
    /// counters (first pass) and has its COPIED flags checked against the stored refcounts.
    mutating func walkL1(_ l1: OnDiskTable<UInt64>, l1Offset: UInt64, l1Bytes: UInt64, label: String, active: Bool) throws {
        if l1Bytes > 0 && !visitedL1.insert(l1Offset).inserted {
            corruption("\(label) L1 table at offset \(l1Offset) is also another snapshot's L1 table")
            return
        }
        reference(.l1, "\(label) L1 table", offset: l1Offset, length: l1Bytes)
        epoch &+= 1
        var allocated: UInt64 = 0, fragmented: UInt64 = 0, compressed: UInt64 = 0
        var nextContiguous: UInt64 = 0
        try l1.forEach(notEqualTo: 0) { next, e in
            if stopped { return false }
            let l2 = e & QCOW2Image.l1OffsetMask
            if l2 == 0 { return true }
            if l2 % cs != 0 {
                corruption("\(label) L1 entry \(next): L2 table offset 0x\(String(l2, radix: 16)) is not cluster-aligned")
                return true
            }
            if !fits(l2, cs, in: fileSize) {
                corruption("\(label) L1 entry \(next): L2 table at offset \(l2) lies past the end of the file")
                return true
            }
            if !firstWalk(ofL2: l2) {
                corruption("\(label) L1 entry \(next): L2 table at offset \(l2) is already used by another entry")
                return true
            }
            reference(.l2, "\(label) L2 table \(next)", offset: l2, length: cs)
            if active { copied(e, cluster: l2, "OFLAG_COPIED L2 cluster: l1_index=\(next) l1_entry=\(String(e, radix: 16))") }
            nextContiguous = 0  // qemu counts fragmentation within one L2 table
            let table = try OnDiskTable<UInt64>.load(image.files[0], at: l2, count: Int(cs / 8), bigEndian: true, what: "qcow2 L2 table")
            workLeft -= table.count
            if workLeft < 0 {
                result.checkErrors += 1
                result.messages.append("the metadata references more L2 tables than a file of \(fileSize) bytes can hold: stopped (hostile or corrupt image)")
                return false
            }
            let stride = image.extendedL2 ? 2 : 1
            for j in 0..<(table.count / stride) where !stopped {
                let entry = table[j * stride]
                if entry == 0 { continue }
                func where_() -> String { "\(label) L2 entry \(next):\(j)" }
                if entry & QCOW2Image.compressedFlag != 0 {
                    if entry & QCOW2Image.copiedFlag != 0 {
                        corruption("\(where_()): compressed cluster has the COPIED flag set")
                    }
                    let (host, size) = image.compressedRange(entry)
                    // The last sector of the file may be partial.
                    reference(.compressed, "\(where_()) compressed cluster", offset: host, length: size)
                    allocated += 1; compressed += 1; fragmented += 1
                    nextContiguous = 0
                    continue
                }
                let host = entry & QCOW2Image.l2OffsetMask
                if image.extendedL2 {
                    let bitmap = table[j * 2 + 1]
                    if UInt32(truncatingIfNeeded: bitmap) & UInt32(truncatingIfNeeded: bitmap >> 32) != 0 {
                        corruption("\(where_()): subcluster bitmap 0x\(String(bitmap, radix: 16)) is corrupt")
                    }
                }
                guard host != 0 else { continue }
                if host % cs != 0 {
                    corruption("\(where_()): cluster offset 0x\(String(host, radix: 16)) is not cluster-aligned")
                    continue
                }
                if image.dataFile != nil { continue }  // data clusters live in the external file
                reference(.data, "\(where_()) data cluster", offset: host, length: cs)
                if active && host < fileSize {
                    copied(entry, cluster: host, "OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16))")
                }
                allocated += 1
                if nextContiguous != 0 && host != nextContiguous { fragmented += 1 }
                nextContiguous = host + cs
            }
            return true
        }
        if active && firstPass {
            result.allocatedClusters = allocated
            result.fragmentedClusters = fragmented
            result.compressedClusters = compressed
        }
    }

    /// Marks the L2 table at `offset` walked for the current L1 table; false if it already was.
    mutating func firstWalk(ofL2 offset: UInt64) -> Bool {
        let c = Int(offset / cs), w = c >> 6
        if l2SeenEpoch[w] != epoch {
            l2SeenEpoch[w] = epoch
            l2Seen[w] = 0
        }
        let bit: UInt64 = 1 << UInt64(c & 63)
        if l2Seen[w] & bit != 0 { return false }
        l2Seen[w] |= bit
        return true
    }

    /// The COPIED flag must be set exactly when the cluster's stored refcount is 1 (active L1 only). A
    /// refcount error: stale by design in a dirty image with lazy refcounts.
    mutating func copied(_ entry: UInt64, cluster host: UInt64, _ what: @autoclosure () -> String) {
        let c = Int(host / cs)
        guard c >= windowStart && c < windowEnd else { return }
        let rc = stored[c - windowStart]
        if (rc == 1) != (entry & QCOW2Image.copiedFlag != 0) {
            result.corruption("\(what()) refcount=\(rc)")
            result.refcountErrors += 1
        }
    }

    /// Persistent dirty bitmaps: the directory, each bitmap table and the clusters it points to. Entries are read
    /// one at a time, never the whole directory.
    mutating func walkBitmaps() throws {
        guard let dir = image.bitmapDirectory, image.autoclearFeatures & 1 != 0 else { return }
        guard dir.size <= 64 << 20, fits(dir.offset, dir.size, in: fileSize) else {
            corruption("bitmap directory at \(dir.offset) (size \(dir.size)) is invalid")
            return
        }
        reference(.bitmap, "bitmap directory", offset: dir.offset, length: dir.size)
        let storage = image.files[0]
        var o: UInt64 = 0
        for _ in 0..<dir.count {
            guard o + 24 <= dir.size else { corruption("bitmap directory is truncated"); return }
            let d = try storage.readBytes(at: dir.offset + o, count: 24, what: "bitmap directory entry")
            let tableOffset = d.be64(0), tableSize = UInt64(d.be32(8))
            let nameSize = UInt64(d.be16(18)), extra = UInt64(d.be32(20))
            if tableSize * 8 > 64 << 20 || !fits(tableOffset, tableSize * 8, in: fileSize) {
                corruption("bitmap table at \(tableOffset) with \(tableSize) entries is invalid")
            } else {
                reference(.bitmap, "bitmap table", offset: tableOffset, length: tableSize * 8)
                let t = try OnDiskTable<UInt64>(storage: storage, offset: tableOffset, count: Int(tableSize), bigEndian: true,
                                                what: "bitmap table")
                try t.forEach(notEqualTo: 0) { _, e in
                    let c = e & 0x00ff_ffff_ffff_fe00
                    if c != 0 { reference(.bitmap, "bitmap data cluster", offset: c, length: cs) }
                    return true
                }
            }
            o += (24 + extra + nameSize + 7) / 8 * 8
        }
    }

    /// Reads the stored refcounts of the window's clusters into `stored`, referencing the refcount table and
    /// every refcount block as it goes.
    mutating func loadStoredRefcounts() throws {
        let rtBytes = UInt64(image.refcountTableClusters) * cs
        reference(.refcountTable, "refcount table", offset: image.refcountTableOffset, length: rtBytes)
        let rt = try OnDiskTable<UInt64>(storage: image.files[0], offset: image.refcountTableOffset, count: Int(rtBytes / 8),
                                         bigEndian: true, what: "refcount table")
        let bits = 1 << Int(image.refcountOrder)
        let perBlock = Int(cs) * 8 / bits
        try rt.forEach(notEqualTo: 0) { next, e in
            let block = e & QCOW2Image.refcountTableOffsetMask
            if block == 0 { return true }
            if block % cs != 0 {
                corruption("refcount block \(next) offset 0x\(String(block, radix: 16)) is not cluster-aligned")
                return true
            }
            if !fits(block, cs, in: fileSize) {
                corruption("refcount block \(next) at offset \(block) is outside the image")
                return true
            }
            reference(.refcountBlock, "refcount block \(next)", offset: block, length: cs)
            // Only blocks that describe clusters of this window (or past the end of the file, on the first pass)
            // are read.
            let firstCluster = next * perBlock
            guard firstCluster < windowEnd && firstCluster + perBlock > windowStart
                    || (firstPass && firstCluster + perBlock > fileClusters) else { return true }
            let b = try image.files[0].readBytes(at: block, count: Int(cs), what: "refcount block")
            for k in 0..<perBlock {
                let v: UInt64
                switch bits {
                case 1, 2, 4: v = UInt64(b[k * bits / 8] >> UInt8((k * bits) % 8)) & ((1 << UInt64(bits)) - 1)
                case 8: v = UInt64(b[k])
                case 16: v = UInt64(b.be16(k * 2))
                case 32: v = UInt64(b.be32(k * 4))
                default: v = b.be64(k * 8)
                }
                guard v != 0 else { continue }
                let cluster = firstCluster + k
                if cluster >= fileClusters {
                    if firstPass { result.leak("cluster \(cluster): refcount \(v) for a cluster past the end of the file") }
                } else if cluster >= windowStart && cluster < windowEnd {
                    stored[cluster - windowStart] = UInt16(min(v, UInt64(UInt16.max)))
                }
            }
            return true
        }
    }

    /// Stored against computed, for the window's clusters.
    mutating func compare() {
        for i in 0..<(windowEnd - windowStart) {
            let s = stored[i], r = computed[i]
            if s > 0 || r > 0 { highest = windowStart + i }
            if s == r || (s == .max && r == .max) { continue }
            if s < r {
                result.corruption("cluster \(windowStart + i) refcount=\(s) reference=\(r)")
                result.refcountErrors += 1
            } else {
                result.leak("cluster \(windowStart + i) refcount=\(s) reference=\(r)")
            }
        }
    }
}
