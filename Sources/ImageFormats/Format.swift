/// The image formats imgconv reads, spelled as qemu-img spells them.
public enum ImageFormat: String, Sendable, CaseIterable, Codable {
    case raw, qcow2, vmdk, vpc, vdi

    /// Parses a format name as given on a command line; `vhd` is accepted for `vpc`.
    public init(name: String) throws {
        switch name.lowercased() {
        case "vhd", "vpc": self = .vpc
        default:
            guard let f = ImageFormat(rawValue: name.lowercased()) else { throw ImageError.unknownFormatName(name) }
            self = f
        }
    }
}
