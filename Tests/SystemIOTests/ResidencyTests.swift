import Foundation
import SystemIO
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("residency")
struct ResidencyTests {
    @Test func onlyReadOnlyFileMappingsAreChosen() {
        let maps = """
        55d0c0a00000-55d0c0c00000 r--p 00000000 fe:00 1234                       /usr/bin/imgconv-agent
        55d0c0c00000-55d0c1000000 r-xp 00200000 fe:00 1234                       /usr/bin/imgconv-agent
        55d0c1000000-55d0c1010000 rw-p 00600000 fe:00 1234                       /usr/bin/imgconv-agent
        55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0                          [heap]
        7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
        7f0000100000-7f0000200000 r--s 00000000 fe:00 99                         /var/lib/imgconv/index.sqlite-shm
        7f0000200000-7f0000300000 rw-s 00000000 fe:00 99                         /var/lib/imgconv/index.sqlite-shm
        7f0000300000-7f0000400000 r-xp 00000000 fe:00 77                         /usr/lib/with space/librados.so.2 (deleted)
        7f0000400000-7f0000401000 r--p 00000000 00:00 0                          memfd:ceph (deleted)
        7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
        7f0000500000-7f0000400000 r--p 00000000 fe:00 1                          /backwards
        garbage line
        """
        let chosen = Residency.readOnlyFileMappings(maps: maps)
        #expect(chosen.map(\.path) == ["/usr/bin/imgconv-agent", "/usr/bin/imgconv-agent",
                                        "/var/lib/imgconv/index.sqlite-shm", "/usr/lib/with space/librados.so.2 (deleted)"])
        #expect(chosen[0].start == 0x55d0_c0a0_0000 && chosen[0].end == 0x55d0_c0c0_0000)
    }

    /// Pages of a read-only file mapping leave the page cache; a writable private mapping keeps its pages and
    /// what was written into them.
    @Test func pageOutDropsReadOnlyFilePagesAndKeepsWrittenOnes() throws {
        let size = 8 << 20, page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let dir = FileManager.default.currentDirectoryPath + "/.build/residency-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func mapped(_ name: String, writable: Bool) throws -> UnsafeMutableRawPointer {
            let path = "\(dir)/\(name)"
            var bytes = [UInt8](repeating: 0, count: size)
            for i in stride(from: 0, to: size, by: 64) { bytes[i] = UInt8(truncatingIfNeeded: i >> 6) }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            let fd = open(path, O_RDONLY)
            #expect(fd >= 0)
            defer { close(fd) }
            #expect(fsync(fd) == 0)
            let p = mmap(nil, size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_PRIVATE, fd, 0)!
            #expect(p != MAP_FAILED)
            var sum = 0
            for i in stride(from: 0, to: size, by: page) { sum &+= Int(p.load(fromByteOffset: i, as: UInt8.self)) }
            #expect(sum >= 0)
            return p
        }
        func residentPages(_ p: UnsafeMutableRawPointer) -> Int {
            var vec = [UInt8](repeating: 0, count: size / page)
            #expect(mincore(p, size, &vec) == 0)
            return vec.filter { $0 & 1 != 0 }.count
        }
        let readOnly = try mapped("read-only", writable: false)
        let writable = try mapped("writable", writable: true)
        defer { munmap(readOnly, size); munmap(writable, size) }
        writable.storeBytes(of: 0xA5, toByteOffset: 4096 * 3 + 1, as: UInt8.self)
        #expect(residentPages(readOnly) == size / page)
        #expect(residentPages(writable) == size / page)

        let result = Residency.pageOut()
        #expect(result.mappings > 0 && result.bytes >= UInt64(size))
        // Pages other processes also map (libc) stay; the file only this process maps goes.
        #expect(residentPages(readOnly) < size / page / 4, "\(residentPages(readOnly)) of \(size / page) pages still resident")
        #expect(residentPages(writable) == size / page)
        #expect(writable.load(fromByteOffset: 4096 * 3 + 1, as: UInt8.self) == 0xA5)
        // Paged in again on the next touch, with the file's bytes.
        #expect(readOnly.load(fromByteOffset: 64 * 5, as: UInt8.self) == 5)
    }

    @Test func residentMemoryIsSplitByKind() throws {
        let r = try #require(Residency.resident())
        #expect(r.anonymous > 0 && r.file > 0)
        // The total counts shared memory too, and moves between the two reads: within a MiB of the split's sum.
        let total = try #require(Residency.residentBytes())
        #expect(total + (1 << 20) >= r.anonymous + r.file)
    }
}
