import Glance
import ImageFormats

/// Why the cache could not do what was asked. Each message says what to do about it.
public enum CacheError: Error, Sendable, CustomStringConvertible, Equatable {
    case invalidID(String)
    case notCached(String)
    case unsupportedFormat(id: String, diskFormat: String, containerFormat: String)
    case unsafe(id: String, reasons: [String])
    case noRoom(id: String, needed: UInt64, available: UInt64)
    case busy(id: String, why: String)
    case io(String)
    case upstream(GlanceError)

    public var description: String {
        switch self {
        case let .invalidID(s):
            return "'\(s.prefix(80))' is not an image id (a Glance image id is a UUID)"
        case let .notCached(id):
            return "image \(id) is not in the cache"
        case let .unsupportedFormat(id, d, c):
            return "image \(id) has disk_format '\(d)' / container_format '\(c)'; the cache takes raw, qcow2, vmdk, vhd, vdi and iso in a bare or ovf container"
        case let .unsafe(id, reasons):
            return "image \(id) was refused by the inspection and was not cached: \(reasons.joined(separator: "; "))"
        case let .noRoom(id, needed, available):
            return "image \(id) needs \(needed) bytes but only \(available) can be freed under [cache] max_size / min_free (pinned and in-use images are never evicted); raise max_size or unpin images"
        case let .busy(id, why):
            return "image \(id) is \(why); try again when it is done"
        case let .io(s):
            return s
        case let .upstream(e):
            return e.description
        }
    }

    /// The format the content must have for a Glance disk_format, or nil when the cache does not take it.
    public static func declaredFormat(diskFormat: String?, containerFormat: String?) -> ImageFormat? {
        guard ["bare", "ovf", nil].contains(containerFormat) else { return nil }
        switch diskFormat {
        case "raw", "iso": return .raw
        case "qcow2": return .qcow2
        case "vmdk": return .vmdk
        case "vhd": return .vpc
        case "vdi": return .vdi
        default: return nil
        }
    }
}
