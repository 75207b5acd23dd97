/// RAW: the virtual disk is the file. Holes, found with SEEK_DATA/SEEK_HOLE, read as zero.
public final class RawImage: DiskImage {
    public let format = ImageFormat.raw
    public let files: [any ImageStorage]
    public var virtualSize: UInt64 { files[0].size }

    public init(storage: any ImageStorage) { files = [storage] }

    public func segment(at offset: UInt64, until end: UInt64) throws -> Segment {
        let (isData, end) = try files[0].allocation(at: offset)
        let len = max(1, min(end, virtualSize) - offset)
        return Segment(start: offset, length: len, mapping: isData ? .data(file: 0, host: offset) : .zero(host: offset))
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try files[0].read(into: buffer, at: offset, what: "raw data")
    }

    public func info() -> ImageInfo {
        var i = ImageInfo(filename: files[0].name, format: .raw, virtualSize: virtualSize)
        i.actualSize = files[0].allocatedBytes
        return i
    }

    /// A raw file has no metadata, so nothing in it can be inconsistent.
    public func check() throws -> CheckResult { CheckResult(filename: files[0].name, format: .raw) }
}
