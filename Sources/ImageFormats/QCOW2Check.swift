/// qemu-img check for qcow2: rebuild every cluster's reference count from the metadata (header, L1 and L2
/// tables, data clusters, refcount structures, snapshots, bitmaps) and compare it with the stored refcounts.
/// Stored < referenced is a corruption; stored > referenced is a leak. Memory: two 16-bit counters per host
/// cluster of the file (bounded by the file size, never the virtual size).
struct QCOW2Checker {
    let image: QCOW2Image
    var result: CheckResult
    var computed: [UInt16] = []
    var stored: [UInt16] = []
    let fileClusters: Int
    /// The most host clusters one check will count (256 Mi clusters: 1 GiB of counters).
    static let maxClusters = 1 << 28
    /// L2 entries left to walk. Legitimate images walk each L2 table once per L1 table that holds it (the
    /// active one and each snapshot's); forged ones can point thousands of L1 entries or snapshots at one
    /// table. The budget, 16 walks of every 8 bytes of the file (at least 1 Mi entries), bounds the time.
    var workLeft: Int
    var visitedL1: Set<UInt64> = []

    init(image: QCOW2Image) {
        self.image = image
        result = CheckResult(filename: image.files[0].name, format: .qcow2)
        fileClusters = Int(divRoundUp(image.files[0].size, image.clusterSize))
        workLeft = max(1 << 20, Int(min(image.files[0].size / 8, UInt64(Int.max / 32))) * 16)
    }

    var cs: UInt64 { image.clusterSize }
    var fileSize: UInt64 { image.files[0].size }

    /// Counts one reference to every cluster in `offset ..< offset+length`.
    mutating func reference(_ what: @autoclosure () -> String, offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        // A cluster counts as inside the file if any of it is: qemu extends a file only as far as it wrote
        // (extended L2 subclusters, the last compressed sector).
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || (end - 1) / cs >= UInt64(fileClusters) {
            let size = fileSize, name = what()
            result.corruption("\(name) at offset \(offset) (length \(length)) lies past the end of the file (\(size) bytes)")
            return
        }
        let first = Int(offset / cs), last = Int((end - 1) / cs)
        for c in first...last where computed[c] < UInt16.max { computed[c] += 1 }
    }

    mutating func run() throws -> CheckResult {
        if fileClusters > Self.maxClusters {
            result.checkErrors += 1
            result.messages.append("the file has \(fileClusters) clusters, more than the \(Self.maxClusters) a check counts")
            return result
        }
        computed = [UInt16](repeating: 0, count: fileClusters)
        stored = [UInt16](repeating: 0, count: fileClusters)
        result.totalClusters = divRoundUp(image.virtualSize, cs)

        reference("header", offset: 0, length: cs)
        try walkL1(image.l1.map { $0 }, l1Offset: image.l1Offset, l1Size: UInt32(image.l1.count), label: "active", stats: true)
        for s in image.snapshots where workLeft >= 0 {
            guard s.l1Offset % cs == 0, UInt64(s.l1Size) * 8 <= QCOW2Image.maxL1Bytes else {
                result.corruption("snapshot \(s.info.id): L1 table at \(s.l1Offset) with \(s.l1Size) entries is invalid")
                continue
            }
            guard fits(s.l1Offset, UInt64(s.l1Size) * 8, in: fileSize) else {
                result.corruption("snapshot \(s.info.id): L1 table at \(s.l1Offset) lies past the end of the file")
                continue
            }
            let raw = try image.files[0].readBytes(at: s.l1Offset, count: Int(s.l1Size) * 8, what: "snapshot L1 table")
            try walkL1((0..<Int(s.l1Size)).map { raw.be64($0 * 8) }, l1Offset: s.l1Offset, l1Size: s.l1Size,
                       label: "snapshot \(s.info.id)", stats: false)
        }
        if !image.snapshots.isEmpty {
            reference("snapshot table", offset: image.snapshotsOffset, length: image.snapshotsTableSize)
        }
        if workLeft < 0 { return result }
        try walkBitmaps()
        try loadStoredRefcounts()
        compare()
        try checkCopiedFlags()
        return result
    }

    /// References an L1 table, its L2 tables and their clusters; with `stats`, fills the allocation counters.
    mutating func walkL1(_ l1: [UInt64], l1Offset: UInt64, l1Size: UInt32, label: String, stats: Bool) throws {
        reference("\(label) L1 table", offset: l1Offset, length: UInt64(l1Size) * 8)
        if l1Size > 0 && !visitedL1.insert(l1Offset).inserted {
            result.corruption("\(label) L1 table at offset \(l1Offset) is also another snapshot's L1 table")
            return
        }
        var allocated: UInt64 = 0, fragmented: UInt64 = 0, compressed: UInt64 = 0
        var nextContiguous: UInt64 = 0
        var seenL2 = Set<UInt64>()
        for (i, e) in l1.enumerated() {
            let l2 = e & QCOW2Image.l1OffsetMask
            if l2 == 0 { continue }
            if !seenL2.insert(l2).inserted {
                result.corruption("\(label) L1 entry \(i): L2 table at offset \(l2) is already used by another entry")
                continue
            }
            if l2 % cs != 0 {
                result.corruption("\(label) L1 entry \(i): L2 table offset 0x\(String(l2, radix: 16)) is not cluster-aligned")
                continue
            }
            if !fits(l2, cs, in: fileSize) {
                result.corruption("\(label) L1 entry \(i): L2 table at offset \(l2) lies past the end of the file")
                continue
            }
            reference("\(label) L2 table", offset: l2, length: cs)
            nextContiguous = 0  // qemu counts fragmentation within one L2 table
            let table = try image.l2Table(at: l2)
            workLeft -= table.count
            if workLeft < 0 {
                result.checkErrors += 1
                result.messages.append("the metadata references more L2 tables than a file of \(fileSize) bytes can hold: stopped (hostile or corrupt image)")
                return
            }
            let stride = image.extendedL2 ? 2 : 1
            for j in 0..<(table.count / stride) {
                let entry = table[j * stride]
                func where_() -> String { "\(label) L2 entry \(i):\(j)" }
                if entry & QCOW2Image.compressedFlag != 0 {
                    if entry & QCOW2Image.copiedFlag != 0 {
                        result.corruption("\(where_()): compressed cluster has the COPIED flag set")
                    }
                    let (host, size) = image.compressedRange(entry)
                    // The last sector of the file may be partial.
                    reference("\(where_()) compressed cluster", offset: host, length: size)
                    allocated += 1; compressed += 1; fragmented += 1
                    nextContiguous = 0
                    continue
                }
                let host = entry & QCOW2Image.l2OffsetMask
                if image.extendedL2 {
                    let bitmap = table[j * 2 + 1]
                    if UInt32(truncatingIfNeeded: bitmap) & UInt32(truncatingIfNeeded: bitmap >> 32) != 0 {
                        result.corruption("\(where_()): subcluster bitmap 0x\(String(bitmap, radix: 16)) is corrupt")
                    }
                }
                guard host != 0 else { continue }
                if host % cs != 0 {
                    result.corruption("\(where_()): cluster offset 0x\(String(host, radix: 16)) is not cluster-aligned")
                    continue
                }
                if image.dataFile != nil { continue }  // data clusters live in the external file
                reference("\(where_()) data cluster", offset: host, length: cs)
                allocated += 1
                if nextContiguous != 0 && host != nextContiguous { fragmented += 1 }
                nextContiguous = host + cs
            }
        }
        if stats {
            result.allocatedClusters = allocated
            result.fragmentedClusters = fragmented
            result.compressedClusters = compressed
        }
    }

    /// Persistent dirty bitmaps: the directory, each bitmap table and the clusters it points to.
    mutating func walkBitmaps() throws {
        guard let dir = image.bitmapDirectory, image.autoclearFeatures & 1 != 0 else { return }
        guard dir.size <= 64 << 20, fits(dir.offset, dir.size, in: fileSize) else {
            result.corruption("bitmap directory at \(dir.offset) (size \(dir.size)) is invalid")
            return
        }
        reference("bitmap directory", offset: dir.offset, length: dir.size)
        let d = try image.files[0].readBytes(at: dir.offset, count: Int(dir.size), what: "bitmap directory")
        var o = 0
        for _ in 0..<dir.count {
            guard o + 24 <= d.count else { result.corruption("bitmap directory is truncated"); return }
            let tableOffset = d.be64(o), tableSize = UInt64(d.be32(o + 8))
            let nameSize = Int(d.be16(o + 18)), extra = Int(d.be32(o + 20))
            if tableSize * 8 > 64 << 20 || !fits(tableOffset, tableSize * 8, in: fileSize) {
                result.corruption("bitmap table at \(tableOffset) with \(tableSize) entries is invalid")
            } else {
                reference("bitmap table", offset: tableOffset, length: tableSize * 8)
                let t = try image.files[0].readBytes(at: tableOffset, count: Int(tableSize) * 8, what: "bitmap table")
                for k in 0..<Int(tableSize) {
                    let c = t.be64(k * 8) & 0x00ff_ffff_ffff_fe00
                    if c != 0 { reference("bitmap data cluster", offset: c, length: cs) }
                }
            }
            o += (24 + extra + nameSize + 7) / 8 * 8
        }
    }

    /// Reads the refcount table and blocks into `stored`, referencing them as it goes.
    mutating func loadStoredRefcounts() throws {
        let rtBytes = UInt64(image.refcountTableClusters) * cs
        reference("refcount table", offset: image.refcountTableOffset, length: rtBytes)
        let rt = try image.files[0].readBytes(at: image.refcountTableOffset, count: Int(rtBytes), what: "refcount table")
        let bits = 1 << Int(image.refcountOrder)
        let perBlock = Int(cs) * 8 / bits
        for i in 0..<(rt.count / 8) {
            let block = rt.be64(i * 8) & QCOW2Image.refcountTableOffsetMask
            if block == 0 { continue }
            if block % cs != 0 {
                result.corruption("refcount block \(i) offset 0x\(String(block, radix: 16)) is not cluster-aligned")
                continue
            }
            if !fits(block, cs, in: fileSize) {
                result.corruption("refcount block \(i) at offset \(block) is outside the image")
                continue
            }
            reference("refcount block \(i)", offset: block, length: cs)
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
                let cluster = i * perBlock + k
                if cluster < fileClusters {
                    stored[cluster] = UInt16(min(v, UInt64(UInt16.max)))
                } else {
                    result.leak("cluster \(cluster): refcount \(v) for a cluster past the end of the file")
                }
            }
        }
    }

    mutating func compare() {
        var highest = -1
        for c in 0..<fileClusters {
            let s = stored[c], r = computed[c]
            if s > 0 || r > 0 { highest = c }
            if s == r || (s == .max && r == .max) { continue }
            if s < r {
                result.corruption("cluster \(c) refcount=\(s) reference=\(r)")
            } else {
                result.leak("cluster \(c) refcount=\(s) reference=\(r)")
            }
        }
        result.imageEndOffset = UInt64(highest + 1) * cs
    }

    /// The COPIED flag must be set exactly when a cluster's refcount is 1 (active L1 only).
    mutating func checkCopiedFlags() throws {
        for (i, e) in image.l1.enumerated() {
            let l2 = e & QCOW2Image.l1OffsetMask
            guard l2 != 0, l2 % cs == 0, fits(l2, cs, in: fileSize) else { continue }
            let rc = stored[Int(l2 / cs)]
            if (rc == 1) != (e & QCOW2Image.copiedFlag != 0) {
                result.corruption("OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(e, radix: 16)) refcount=\(rc)")
            }
            guard image.dataFile == nil else { continue }
            let table = try image.l2Table(at: l2)
            let stride = image.extendedL2 ? 2 : 1
            for j in 0..<(table.count / stride) {
                let entry = table[j * stride]
                let host = entry & QCOW2Image.l2OffsetMask
                guard entry & QCOW2Image.compressedFlag == 0, host != 0, host % cs == 0, host < fileSize else { continue }
                let rc = stored[Int(host / cs)]
                if (rc == 1) != (entry & QCOW2Image.copiedFlag != 0) {
                    result.corruption("OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(rc)")
                }
            }
        }
    }
}
