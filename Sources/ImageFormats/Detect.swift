/// Format detection by content, never by file name.
public enum FormatDetector {
    static let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]  // "QFI\xfb"
    static let vmdkSparseMagic: [UInt8] = Array("KDMV".utf8)
    static let vmdkCOWDMagic: [UInt8] = Array("COWD".utf8)
    static let vpcCookie: [UInt8] = Array("conectix".utf8)
    static let vdiSignature: UInt32 = 0xbeda_107f

    /// Every format whose signature the content carries, strongest first. Raw when none matches.
    /// More than one entry means the file is ambiguous (a polyglot), which the inspection step refuses.
    public static func candidates(_ storage: any ImageStorage) throws -> [ImageFormat] {
        let headLen = Int(min(storage.size, 4096))
        let head = try storage.readBytes(at: 0, count: headLen, what: "header")
        var found: [ImageFormat] = []
        // qcow version 1 shares the magic: it is a foreign format (ForeignImage.probe), not a qcow2.
        if head.hasPrefix(qcow2Magic) && !(head.count >= 8 && head.be32(4) == 1) { found.append(.qcow2) }
        if head.hasPrefix(vmdkSparseMagic) || head.hasPrefix(vmdkCOWDMagic) || isVMDKDescriptor(head) {
            found.append(.vmdk)
        }
        if head.count >= 0x44 && head.le32(0x40) == vdiSignature { found.append(.vdi) }
        if head.hasPrefix(vpcCookie) {
            found.append(.vpc)
        } else if storage.size >= 512 {
            let tail = try storage.readBytes(at: storage.size - 512, count: 512, what: "VHD footer")
            if tail.hasPrefix(vpcCookie) && VPCImage.footerChecksumValid(tail) { found.append(.vpc) }
        }
        return found.isEmpty ? [.raw] : found
    }

    /// The detected format: the strongest candidate.
    public static func detect(_ storage: any ImageStorage) throws -> ImageFormat {
        try candidates(storage)[0]
    }

    /// A VMDK text descriptor: printable text whose first meaningful line is `version=N` and which names a
    /// createType (qemu's probe looks for the same).
    static func isVMDKDescriptor(_ head: [UInt8]) -> Bool {
        // qemu pads descriptors it writes with NULs to a sector: text, then nothing but NULs.
        let textEnd = head.firstIndex(of: 0) ?? head.count
        guard textEnd > 0, head[textEnd...].allSatisfy({ $0 == 0 }) else { return false }
        var sawVersion = false
        for line in descriptorLines(head, upTo: textEnd) {
            if !sawVersion {
                guard line.hasPrefix("version=") || line.hasPrefix("version =") else { return false }
                sawVersion = true
                continue
            }
            if line.hasPrefix("createType") { return true }
        }
        return false
    }
}

/// The meaningful lines of a text descriptor (trimmed; no blanks, no `#` comments), split at byte level: a
/// hostile 64 KiB descriptor must not cost Character-by-Character work.
func descriptorLines(_ bytes: [UInt8], upTo end: Int? = nil) -> [String] {
    let n = min(end ?? bytes.count, bytes.count)
    return bytes.withUnsafeBufferPointer { u in
    var out: [String] = []
    var i = 0
    while i < n {
        var j = i
        while j < n && u[j] != 10 && u[j] != 13 { j += 1 }
        var a = i, b = j
        while a < b && (u[a] == 32 || u[a] == 9) { a += 1 }
        while b > a && (u[b - 1] == 32 || u[b - 1] == 9) { b -= 1 }
        if a < b && u[a] != 35 { out.append(String(decoding: UnsafeBufferPointer(rebasing: u[a..<b]), as: UTF8.self)) }
        i = j + 1
    }
    return out
    }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s.removeFirst() }
        while let l = s.last, l == " " || l == "\t" { s.removeLast() }
        return String(s)
    }
}
