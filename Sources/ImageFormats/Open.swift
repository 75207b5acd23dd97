#if canImport(Glibc)
import Glibc
#endif

/// Limits and permissions for opening an image. One struct, validated in one place.
public struct OpenOptions: Sendable {
    /// Open the files a VMDK descriptor names as extents. Off by default: a hostile descriptor can name
    /// any host file (CVE-2022-47951). Even when on, only plain names in the descriptor's own directory are
    /// opened: no '/', no '..'.
    public var allowVMDKExtentFiles = false
    /// The largest virtual size accepted (default 64 TiB), checked before any table is sized from it.
    public var maxVirtualSize: UInt64 = 64 << 40
    /// Memory for cached metadata tables (qcow2 L2, VMDK grain tables, VHD bitmaps) per image.
    /// 32 MiB covers 256 GiB of a 64 KiB-cluster qcow2 with no misses.
    public var metadataCacheBytes = 32 << 20

    public init() {}
}

/// Opens images by path or storage, checking the declared format against the content.
public enum ImageOpener {
    /// Opens `path`. With `declared`, the content must be that format or this throws `formatMismatch`:
    /// an image is never quietly read as something else.
    public static func open(path: String, declared: ImageFormat? = nil,
                            options: OpenOptions = OpenOptions()) throws -> any DiskImage {
        let storage = try FileStorage(path: path)
        // Extents are named relative to the descriptor, as qemu names them (so `info` prints the same paths).
        let directory = path.lastIndex(of: "/").map { String(path[...$0]) } ?? ""
        return try open(storage: storage, declared: declared, options: options) { name in
            try FileStorage(path: directory + name)
        }
    }

    /// Opens an image on any storage. `extentOpener` opens a VMDK extent by its plain file name; it is
    /// called only when `options.allowVMDKExtentFiles` is set and the name passed the checks.
    public static func open(storage: any ImageStorage, declared: ImageFormat? = nil,
                            options: OpenOptions = OpenOptions(),
                            extentOpener: ((String) throws -> any ImageStorage)? = nil) throws -> any DiskImage {
        if let f = try ForeignImage.probe(storage).first { throw ImageError.unsupportedFormat(f.format, declared: declared) }
        let detected = try FormatDetector.detect(storage)
        let format = declared ?? detected
        if let declared, declared != detected {
            throw ImageError.formatMismatch(declared: declared, detected: detected)
        }
        switch format {
        case .raw: return RawImage(storage: storage)
        case .qcow2: return try QCOW2Image(storage: storage, options: options)
        case .vmdk: return try VMDKImage(storage: storage, options: options, extentOpener: extentOpener)
        case .vpc: return try VPCImage(storage: storage, options: options)
        case .vdi: return try VDIImage(storage: storage, options: options)
        }
    }
}
