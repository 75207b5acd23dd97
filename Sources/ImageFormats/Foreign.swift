/// Formats imgconv recognises but does not read. qemu-img reads them (and through them has read host files and
/// more); imgconv names them as qemu-img does in `info`, refuses them in `inspect` and `convert`, and never reads
/// one as raw: not when nothing is declared, and not when the caller declares raw. See formats/foreign.md.
public enum ForeignFormat: String, CaseIterable, Sendable {
    /// qcow version 1 (`QFI\xfb`, version 1).
    case qcow
    case qed, vhdx, luks, parallels, bochs, cloop, dmg

    /// What the operator reads in a message.
    public var displayName: String {
        switch self {
        case .qcow: return "qcow (version 1)"
        case .qed: return "QED"
        case .vhdx: return "VHDX"
        case .luks: return "LUKS"
        case .parallels: return "Parallels"
        case .bochs: return "Bochs"
        case .cloop: return "cloop"
        case .dmg: return "Apple DMG"
        }
    }
}

/// A recognised image of a foreign format: what its header says, as far as `qemu-img info` would show it.
public struct ForeignImage: Sendable, Equatable {
    public var format: ForeignFormat
    /// The virtual size the header declares, when it declares one plainly.
    public var virtualSize: UInt64?
    public var clusterSize: UInt64?
    public var encrypted = false

    /// qemu-img info's fields for it (a virtual size of 0 when the header does not say).
    public func info(filename: String, actualSize: UInt64?) -> ImageInfo {
        var i = ImageInfo(filename: filename, formatName: format.rawValue, virtualSize: virtualSize ?? 0)
        i.clusterSize = clusterSize
        i.actualSize = actualSize
        i.encrypted = encrypted
        return i
    }

    static let bochsMagic = Array("Bochs Virtual HD Image".utf8) + [0]
    static let cloopMagic = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)
    static let luksMagic: [UInt8] = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]
    static let vhdxMetadataRegion: [UInt8] = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
    static let vhdxVirtualDiskSize: [UInt8] = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    static let vhdxFileParameters: [UInt8] = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")

    /// Every foreign format whose signature the content carries, probed as qemu probes them (by content only:
    /// qemu's DMG probe looks at the file name, imgconv at the `koly` trailer).
    public static func probe(_ storage: any ImageStorage) throws -> [ForeignImage] {
        let head = try storage.readBytes(at: 0, count: Int(min(storage.size, 512)), what: "header")
        var found: [ForeignImage] = []
        if head.count >= 34, head.hasPrefix(FormatDetector.qcow2Magic), head.be32(4) == 1 {
            found.append(ForeignImage(format: .qcow, virtualSize: head.be64(24),
                                      clusterSize: head[32] < 64 ? UInt64(1) << UInt64(head[32]) : nil))
        }
        if head.count >= 56, head.hasPrefix(Array("QED".utf8) + [0]) {
            let cs = UInt64(head.le32(4))
            found.append(ForeignImage(format: .qed, virtualSize: head.le64(48), clusterSize: cs > 0 ? cs : nil))
        }
        if head.hasPrefix(Array("vhdxfile".utf8)) {
            let (size, block) = (try? vhdxSizes(storage)) ?? (nil, nil)
            found.append(ForeignImage(format: .vhdx, virtualSize: size, clusterSize: block))
        }
        if head.hasPrefix(luksMagic) {
            // LUKS1: the payload starts at payload-offset sectors and runs to the end of the file.
            var size: UInt64?
            if head.count >= 108 && head.be16(6) == 1 {
                let payload = UInt64(head.be32(104)) * 512
                size = storage.size > payload ? storage.size - payload : 0
            }
            found.append(ForeignImage(format: .luks, virtualSize: size, encrypted: true))
        }
        if head.count >= 44, head.hasPrefix(Array("WithoutFreeSpace".utf8)) || head.hasPrefix(Array("WithouFreSpacExt".utf8)),
           head.le32(16) == 2 {
            let sectors = head.le64(36)
            found.append(ForeignImage(format: .parallels, virtualSize: sectors < UInt64.max / 512 ? sectors * 512 : nil))
        }
        if head.count >= 96, head.hasPrefix(bochsMagic), head.hasPrefix(Array("Redolog".utf8) + [0], at: 32),
           head.hasPrefix(Array("Growing".utf8) + [0], at: 48), [0x0002_0000, 0x0001_0000].contains(head.le32(64)) {
            let disk = head.le32(64) == 0x0002_0000 ? head.le64(88) : head.le64(84)
            found.append(ForeignImage(format: .bochs, virtualSize: disk / 512 * 512))
        }
        if head.count >= 136, head.hasPrefix(cloopMagic) {
            let blockSize = UInt64(head.be32(128)), blocks = UInt64(head.be32(132))
            found.append(ForeignImage(format: .cloop, virtualSize: blockSize * blocks))
        }
        if storage.size >= 1024 {
            let trailer = try storage.readBytes(at: storage.size - 512, count: 512, what: "DMG trailer")
            if trailer.hasPrefix(Array("koly".utf8)), trailer.be32(4) == 4, trailer.be32(8) == 512 {
                let sectors = trailer.be64(0x1ec)
                found.append(ForeignImage(format: .dmg, virtualSize: sectors < UInt64.max / 512 ? sectors * 512 : nil))
            }
        }
        return found
    }

    /// VHDX: the virtual disk size and block size from the metadata region that the first region table names.
    static func vhdxSizes(_ storage: any ImageStorage) throws -> (UInt64?, UInt64?) {
        let rt = try storage.readBytes(at: 192 << 10, count: 4096, what: "VHDX region table")
        guard rt.hasPrefix(Array("regi".utf8)) else { return (nil, nil) }
        let entries = min(Int(rt.le32(8)), (4096 - 16) / 32)
        for e in 0..<entries {
            let o = 16 + e * 32
            guard Array(rt[o..<(o + 16)]) == vhdxMetadataRegion else { continue }
            let region = rt.le64(o + 16)
            let meta = try storage.readBytes(at: region, count: 64 << 10, what: "VHDX metadata table")
            guard meta.hasPrefix(Array("metadata".utf8)) else { return (nil, nil) }
            var size: UInt64?, block: UInt64?
            for k in 0..<min(Int(meta.le16(10)), 2047) {
                let m = 32 + k * 32
                let id = Array(meta[m..<(m + 16)])
                let at = region + UInt64(meta.le32(m + 16))
                if id == vhdxVirtualDiskSize {
                    size = try storage.readBytes(at: at, count: 8, what: "VHDX virtual disk size").le64(0)
                } else if id == vhdxFileParameters {
                    block = UInt64(try storage.readBytes(at: at, count: 4, what: "VHDX file parameters").le32(0))
                }
            }
            return (size, block)
        }
        return (nil, nil)
    }

    /// A GUID as Microsoft formats store it: the first three fields little-endian, the rest as written.
    static func guid(_ text: String) -> [UInt8] {
        let hex = Array(text.replacingHyphens().utf8)
        var b: [UInt8] = []
        var i = 0
        while i + 1 < hex.count {
            b.append(UInt8(String(decoding: hex[i...(i + 1)], as: UTF8.self), radix: 16)!)
            i += 2
        }
        return Array(b[0..<4].reversed()) + Array(b[4..<6].reversed()) + Array(b[6..<8].reversed()) + Array(b[8..<16])
    }
}

private extension String {
    func replacingHyphens() -> String { String(self.filter { $0 != "-" }) }
}
