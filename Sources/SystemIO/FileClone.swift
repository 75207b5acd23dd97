#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("fstatfs")
private func linux_fstatfs(_ fd: Int32, _ buffer: UnsafeMutableRawPointer) -> Int32

/// Extent sharing between two files of one file system (FICLONERANGE, what `cp --reflink` uses): the destination's
/// range points at the source's blocks, and nothing is read or written but metadata. XFS (with reflink, the default
/// since xfsprogs 5.1) and btrfs can; ext4 and tmpfs cannot (EOPNOTSUPP), and files on two file systems never can
/// (EXDEV).
public enum FileClone {
    /// `_IOW(0x94, 13, struct file_clone_range)` from linux/fs.h.
    static let ficlonerange: UInt = 0x4020_940d

    /// Why a clone was refused where copying the bytes is the answer (the file system cannot share extents, the two
    /// files are on different ones, or the ranges are not aligned to its blocks), as opposed to a real I/O error.
    public static func isRefusal(_ errno: Int32) -> Bool {
        errno == EOPNOTSUPP || errno == EXDEV || errno == EINVAL || errno == ENOTTY || errno == EPERM
            || errno == ETXTBSY
    }

    /// Shares `length` bytes at `sourceOffset` of `source` into `destination` at `destinationOffset`. Offsets and
    /// length must be multiples of the file system's block size (`blockSize`).
    public static func cloneRange(from source: Int32, at sourceOffset: UInt64, length: UInt64,
                                  to destination: Int32, at destinationOffset: UInt64, path: String) throws(FileError) {
        // struct file_clone_range { __s64 src_fd; __u64 src_offset, src_length, dest_offset; }
        var range: (Int64, UInt64, UInt64, UInt64) = (Int64(source), sourceOffset, length, destinationOffset)
        let r = withUnsafeMutableBytes(of: &range) { ioctl(destination, ficlonerange, $0.baseAddress!) }
        if r != 0 { throw FileError("FICLONERANGE", path: path, errno: errno) }
    }

    /// File systems that can share extents: XFS, btrfs, bcachefs, OCFS2. Elsewhere (ext4, tmpfs, most network file
    /// systems) a clone is not even tried, so a conversion there pays nothing for this. XFS made without reflink
    /// refuses the first clone, and the converter copies from then on.
    public static func mayShareExtents(_ fd: Int32) -> Bool {
        // struct statfs is not in the Glibc module; its first member is `f_type` (a long on every Linux ABI
        // Swift runs on), and the whole struct is 120 bytes on x86_64 and aarch64.
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 256, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: 256)
        guard linux_fstatfs(fd, buffer) == 0 else { return false }
        let known: Set<Int> = [0x5846_5342, 0x9123_683e, 0xca45_1a4e, 0x7461_636f]
        return known.contains(buffer.load(as: Int.self))
    }

    /// The granularity clones must respect on the file system holding `fd`: its block size.
    public static func blockSize(_ fd: Int32) -> UInt64? {
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_blksize > 0 else { return nil }
        return UInt64(st.st_blksize)
    }

    /// True when both descriptors are on one file system (the first condition for sharing extents).
    public static func sameFileSystem(_ a: Int32, _ b: Int32) -> Bool {
        var sa = stat(), sb = stat()
        return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev
    }
}
