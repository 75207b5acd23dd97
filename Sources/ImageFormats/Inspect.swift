/// Why an image is not safe to convert. `code` is stable (for the agent and for logs); `message` says what was
/// found and why it matters.
public struct SafetyReason: Sendable, Equatable, CustomStringConvertible {
    public var code: String
    public var message: String
    public init(_ code: String, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "\(code): \(message)" }
    var json: JSON { .object([("code", .string(code)), ("message", .string(message))]) }
}

/// The outcome of inspecting an image: the format it is, and whether it is safe to convert.
public struct SafetyVerdict: Sendable {
    /// The readable format the content is; nil when it could not be told, or is a foreign format.
    public var detected: ImageFormat?
    /// A format imgconv recognises but does not read (then `detected` is nil and the verdict unsafe).
    public var foreign: ForeignImage?
    /// Every signature found (more than one: a polyglot).
    public var signatures: [String]
    public var virtualSize: UInt64?
    public var reasons: [SafetyReason]
    public var safe: Bool { reasons.isEmpty }
    /// qemu-img's name of what the content is: the readable format, or the foreign one.
    public var formatName: String? { foreign?.format.rawValue ?? detected?.rawValue }

    public var json: JSON {
        .object([("safe", .bool(safe)), ("reasons", .array(reasons.map(\.json)))])
    }
}

/// The one inspection step every path goes through (CLI, agent, RBD import, Glance clone) before a byte is
/// converted. Every image is hostile until inspected: detection by content, the declared format enforced, foreign
/// formats refused, every table bounded (by opening it), the features each format declares unsafe refused
/// (`DiskImage.featureReasons`), and the structure checked (`DiskImage.structuralReasons`).
public enum ImageInspector {
    /// Signatures that do not make an image unreadable: an ISO 9660 volume is read as raw.
    static let iso9660: (Int, [UInt8]) = (0x8001, Array("CD001".utf8))

    /// Every signature in the content: readable formats first as `FormatDetector` orders them, then foreign
    /// formats, then iso9660.
    public static func signatures(_ storage: any ImageStorage) throws -> [String] {
        var found = try FormatDetector.candidates(storage).filter { $0 != .raw }.map(\.rawValue)
        found += try ForeignImage.probe(storage).map(\.format.rawValue)
        if storage.size >= UInt64(iso9660.0 + iso9660.1.count),
           try storage.readBytes(at: UInt64(iso9660.0), count: iso9660.1.count, what: "signature") == iso9660.1 {
            found.append("iso9660")
        }
        return found
    }

    /// Inspects `storage`. With `declared`, the content must be that format. The image is returned (opened) when
    /// it could be opened, so a caller can go on to convert it after a safe verdict without opening it twice.
    /// With `structural: false` the structural check (every table walked) is left to the caller, who must run
    /// `structuralReasons` before publishing anything read from the image (the converter overlaps it with the copy).
    public static func inspect(storage: any ImageStorage, declared: ImageFormat?, options: OpenOptions = OpenOptions(),
                               structural: Bool = true, extentOpener: ((String) throws -> any ImageStorage)? = nil)
        -> (verdict: SafetyVerdict, image: (any DiskImage)?) {
        var v = SafetyVerdict(detected: nil, signatures: [], virtualSize: nil, reasons: [])
        let foreign: [ForeignImage]
        do {
            v.signatures = try signatures(storage)
            foreign = try ForeignImage.probe(storage)
        } catch {
            v.reasons.append(SafetyReason("unreadable", "\(error)"))
            return (v, nil)
        }
        if v.signatures.count > 1 {
            v.reasons.append(SafetyReason("multiple-formats",
                                          "multiple formats detected (\(v.signatures.joined(separator: ", "))): a polyglot file is read differently by different tools"))
        }
        if let f = foreign.first {
            // Never read as raw, and never as what was declared.
            v.foreign = f
            v.virtualSize = f.virtualSize
            if let declared {
                v.reasons.append(SafetyReason("format-mismatch",
                                              "declared as \(declared.rawValue) but the content is \(f.format.displayName) (\(f.format.rawValue))"))
            } else {
                v.reasons.append(SafetyReason("unsupported-format",
                                              "the content is \(f.format.displayName) (\(f.format.rawValue)), which imgconv recognises but does not read"))
            }
            return (v, nil)
        }
        let detected = v.signatures.compactMap { ImageFormat(rawValue: $0) }.first ?? .raw
        v.detected = detected
        if let declared, declared != detected {
            v.reasons.append(SafetyReason("format-mismatch",
                                          "declared as \(declared.rawValue) but the content is \(detected.rawValue)"))
            return (v, nil)
        }
        let image: any DiskImage
        do {
            image = try ImageOpener.open(storage: storage, declared: detected, options: options, extentOpener: extentOpener)
        } catch let e as ImageError {
            v.reasons.append(reason(for: e))
            return (v, nil)
        } catch {
            v.reasons.append(SafetyReason("unreadable", "\(error)"))
            return (v, nil)
        }
        v.virtualSize = image.virtualSize
        v.reasons += image.featureReasons
        if structural { v.reasons += image.structuralReasons() }
        return (v, image)
    }

    /// Structure: metadata overlapping metadata or pointing outside the file (the image's own check).
    public static func structuralReasons(_ image: any DiskImage) -> [SafetyReason] {
        image.structuralReasons()
    }

    /// The structural verdict from a check result, leaving out `ignoring` corruptions (ones the format knows
    /// to be harmless for reading, such as stale refcounts).
    static func structuralReasons(_ r: CheckResult, ignoring: Int = 0) -> [SafetyReason] {
        let serious = r.corruptions - ignoring
        if serious > 0 || r.checkErrors > 0 {
            let first = r.messages.filter { $0.hasPrefix("ERROR") }.prefix(3).joined(separator: "; ")
            return [SafetyReason("corrupt", "\(serious) structural errors: \(first)")]
        }
        return []
    }

    /// Opens and inspects a file; extent files are offered only when the options allow them.
    public static func inspect(path: String, declared: ImageFormat?, options: OpenOptions = OpenOptions(),
                               structural: Bool = true) -> (verdict: SafetyVerdict, image: (any DiskImage)?) {
        let storage: FileStorage
        do {
            storage = try FileStorage(path: path)
        } catch {
            return (SafetyVerdict(detected: nil, signatures: [], virtualSize: nil, reasons: [SafetyReason("unreadable", "\(error)")]), nil)
        }
        let directory = path.lastIndex(of: "/").map { String(path[...$0]) } ?? ""
        return inspect(storage: storage, declared: declared, options: options, structural: structural) {
            try FileStorage(path: directory + $0)
        }
    }

    static func reason(for e: ImageError) -> SafetyReason {
        switch e {
        case .pastEndOfFile: return SafetyReason("corrupt", e.description)
        case .invalidField: return SafetyReason("invalid", e.description)
        case .limitExceeded: return SafetyReason("limit", e.description)
        case .unsupported: return SafetyReason("unsupported", e.description)
        case .unsupportedFormat: return SafetyReason("unsupported-format", e.description)
        case .externalFile: return SafetyReason("external-file", e.description)
        case .formatMismatch: return SafetyReason("format-mismatch", e.description)
        case .decompression: return SafetyReason("corrupt", e.description)
        case .io, .unknownFormatName, .outOfRange: return SafetyReason("unreadable", e.description)
        }
    }
}

extension DiskImage {
    public var featureReasons: [SafetyReason] { [] }

    public func structuralReasons() -> [SafetyReason] {
        do {
            return ImageInspector.structuralReasons(try check())
        } catch let e as ImageError {
            return [ImageInspector.reason(for: e)]
        } catch {
            return [SafetyReason("corrupt", "\(error)")]
        }
    }
}
