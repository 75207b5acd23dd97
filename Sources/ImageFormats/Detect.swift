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
        if head.hasPrefix(qcow2Magic) { found.append(.qcow2) }
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
        let text = String(decoding: head[..<textEnd], as: UTF8.self)
        var sawVersion = false
        for raw in text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            let line = raw.trimmingSpaces()
            if line.isEmpty || line.hasPrefix("#") { continue }
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

extension StringProtocol {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s.removeFirst() }
        while let l = s.last, l == " " || l == "\t" { s.removeLast() }
        return String(s)
    }
}
