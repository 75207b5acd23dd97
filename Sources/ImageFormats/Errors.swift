#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import SystemIO

/// Every way opening, reading or checking an image can fail. Each case says what is wrong and,
/// through `description`, what the operator can do about it.
public enum ImageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A system call failed.
    case io(operation: String, path: String, errno: Int32)
    /// A structure or a data pointer lies (partly) past the end of the file.
    case pastEndOfFile(what: String, offset: UInt64, length: UInt64, fileSize: UInt64)
    /// A header or table field holds a value the format does not allow.
    case invalidField(format: ImageFormat, field: String, value: String, reason: String)
    /// A value exceeds a hard limit imgconv enforces before allocating or reading.
    case limitExceeded(format: ImageFormat, field: String, value: UInt64, limit: UInt64)
    /// The image uses a feature imgconv does not read.
    case unsupported(format: ImageFormat, feature: String)
    /// The image refers to another file (backing file, data file, extent) that imgconv will not open.
    case externalFile(format: ImageFormat, kind: String, name: String)
    /// The caller declared one format but the content is another.
    case formatMismatch(declared: ImageFormat, detected: ImageFormat)
    /// The content is a format imgconv recognises but does not read (QED, VHDX, LUKS...); with `declared`, the
    /// caller declared a readable format for it.
    case unsupportedFormat(ForeignFormat, declared: ImageFormat?)
    /// Compressed data could not be decompressed into exactly one cluster or grain.
    case decompression(format: ImageFormat, offset: UInt64, reason: String)
    /// An unknown format name was given.
    case unknownFormatName(String)
    /// A read outside the virtual disk.
    case outOfRange(offset: UInt64, length: UInt64, virtualSize: UInt64)

    public var description: String {
        switch self {
        case let .io(op, path, err):
            return "\(op) '\(path)' failed: \(errnoName(err)) (\(String(cString: strerror(err))))"
        case let .pastEndOfFile(what, offset, length, fileSize):
            return "\(what) at offset \(offset) (length \(length)) lies past the end of the file (\(fileSize) bytes): "
                + "the image is truncated or corrupt; re-download it or run 'imgconv check'"
        case let .invalidField(format, field, value, reason):
            return "\(format.rawValue): invalid \(field) \(value): \(reason)"
        case let .limitExceeded(format, field, value, limit):
            return "\(format.rawValue): \(field) \(value) exceeds the limit of \(limit); the image is corrupt or hostile"
        case let .unsupported(format, feature):
            return "\(format.rawValue): \(feature) is not supported"
        case let .externalFile(format, kind, name):
            return "\(format.rawValue): the image refers to \(kind) '\(name)', which imgconv never opens by default"
        case let .formatMismatch(declared, detected):
            return "the image was declared as '\(declared.rawValue)' but its content is '\(detected.rawValue)'; "
                + "refusing to read it as something else (fix the declared format)"
        case let .unsupportedFormat(f, declared?):
            return "the image was declared as '\(declared.rawValue)' but its content is \(f.displayName) ('\(f.rawValue)'), "
                + "which imgconv does not read; refusing to read it as something else"
        case let .unsupportedFormat(f, nil):
            return "the image is \(f.displayName) ('\(f.rawValue)'), which imgconv recognises but does not read "
                + "(it reads raw, qcow2, vmdk, vpc and vdi)"
        case let .decompression(format, offset, reason):
            return "\(format.rawValue): compressed data at offset \(offset) is corrupt: \(reason)"
        case let .unknownFormatName(name):
            return "unknown format '\(name)' (known: raw, qcow2, vmdk, vpc or vhd, vdi)"
        case let .outOfRange(offset, length, size):
            return "read of \(length) bytes at \(offset) is outside the virtual disk (\(size) bytes)"
        }
    }
}
