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
    public var detected: ImageFormat?
    /// Every signature found (more than one: a polyglot).
    public var signatures: [String]
    public var virtualSize: UInt64?
    public var reasons: [SafetyReason]
    public var safe: Bool { reasons.isEmpty }

    public var json: JSON {
        .object([("safe", .bool(safe)), ("reasons", .array(reasons.map(\.json)))])
    }
}

/// The one inspection step every path goes through (CLI, agent, RBD import) before a byte is converted.
/// Every image is hostile until inspected: detection by content, the declared format enforced, every table
/// bounded (by opening it), features that make a reader touch other files refused, and the structure checked.
public enum ImageInspector {
    /// Signatures of formats imgconv recognises but does not read (their presence alone is a reason).
    static let foreign: [(String, Int, [UInt8])] = [
        ("luks", 0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]),
        ("qed", 0, Array("QED".utf8) + [0]),
        ("vhdx", 0, Array("vhdxfile".utf8)),
        ("iso9660", 0x8001, Array("CD001".utf8)),
    ]

    /// Every signature in the content, readable formats first as `FormatDetector` orders them.
    public static func signatures(_ storage: any ImageStorage) throws -> [String] {
        var found = try FormatDetector.candidates(storage).filter { $0 != .raw }.map(\.rawValue)
        for (name, offset, magic) in foreign where storage.size >= UInt64(offset + magic.count) {
            if try storage.readBytes(at: UInt64(offset), count: magic.count, what: "signature") == magic {
                found.append(name)
            }
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
        do {
            v.signatures = try signatures(storage)
        } catch {
            v.reasons.append(SafetyReason("unreadable", "\(error)"))
            return (v, nil)
        }
        if v.signatures.count > 1 {
            v.reasons.append(SafetyReason("multiple-formats",
                                          "multiple formats detected (\(v.signatures.joined(separator: ", "))): a polyglot file is read differently by different tools"))
        }
        if let f = v.signatures.first(where: { s in foreign.contains { $0.0 == s } && s != "iso9660" }) {
            v.reasons.append(SafetyReason("unsupported-format", "the content is \(f), which imgconv does not read"))
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
        v.reasons += featureReasons(image)
        if structural { v.reasons += structuralReasons(image) }
        return (v, image)
    }

    /// Structure: metadata overlapping metadata or pointing outside the file (the image's own check).
    public static func structuralReasons(_ image: any DiskImage) -> [SafetyReason] {
        do {
            let r = try image.check()
            if r.corruptions > 0 || r.checkErrors > 0 {
                let first = r.messages.filter { $0.hasPrefix("ERROR") }.prefix(3).joined(separator: "; ")
                return [SafetyReason("corrupt", "\(r.corruptions) structural errors: \(first)")]
            }
            return []
        } catch let e as ImageError {
            return [reason(for: e)]
        } catch {
            return [SafetyReason("corrupt", "\(error)")]
        }
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
        case .externalFile: return SafetyReason("external-file", e.description)
        case .formatMismatch: return SafetyReason("format-mismatch", e.description)
        case .decompression: return SafetyReason("corrupt", e.description)
        case .io, .unknownFormatName, .outOfRange: return SafetyReason("unreadable", e.description)
        }
    }

    /// Features that make a reader look at other files, or that imgconv will not interpret.
    static func featureReasons(_ image: any DiskImage) -> [SafetyReason] {
        var out: [SafetyReason] = []
        switch image {
        case let q as QCOW2Image:
            if let b = q.backingFile {
                var why = "a backing file makes readers open another file"
                if b.hasPrefix("json:") { why += " (a json: specification can name any protocol or file)" }
                if b.contains("..") || b.hasPrefix("/") { why += " (the name leaves the image's directory)" }
                out.append(SafetyReason("backing-file", "qcow2 backing_file '\(b)': \(why)"))
            }
            if let d = q.dataFile {
                out.append(SafetyReason("data-file", "qcow2 external data_file '\(d)': guest data would be read from another file (CVE-2024-32498)"))
            }
            if q.encryptionMethod != 0 {
                out.append(SafetyReason("encryption", "qcow2 encryption (\(q.encryptionMethod == 1 ? "AES" : "LUKS")) cannot be converted"))
            }
            if q.incompatibleFeatures & QCOW2Image.corruptBit != 0 {
                out.append(SafetyReason("corrupt", "qcow2 header has the corrupt bit set"))
            }
        case let m as VMDKImage:
            if !["monolithicSparse", "streamOptimized"].contains(m.createType) {
                out.append(SafetyReason("vmdk-create-type", "unsupported subformat (createType \"\(m.createType)\"): only monolithicSparse and streamOptimized are safe; other types name extent files (CVE-2022-47951)"))
            }
            for e in m.extents {
                if case .sparse = e.kind, !m.isDescriptorFile { continue }
                out.append(SafetyReason("vmdk-extent", "the descriptor names extent file '\(e.fileName)'"))
            }
            out += m.descriptorProblems
        case let p as VPCImage:
            if p.diskType == VPCImage.differencing {
                out.append(SafetyReason("vhd-parent", "a differencing VHD reads from parent '\(p.parentName ?? "")'"))
            }
            if p.hasParentLocators {
                out.append(SafetyReason("vhd-parent-locator", "the dynamic header carries parent locators (host paths)"))
            }
        case let d as VDIImage:
            if d.hasParent {
                out.append(SafetyReason("vdi-parent", "the VDI names a parent image (UUID \(d.parentUUID.hex))"))
            }
        default:
            break
        }
        return out
    }
}
