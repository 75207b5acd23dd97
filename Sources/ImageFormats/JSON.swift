/// A JSON value whose objects keep their key order, so output can match qemu-img's byte for byte.
public indirect enum JSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])

    public static func == (a: JSON, b: JSON) -> Bool { a.compact() == b.compact() }

    public subscript(key: String) -> JSON? {
        if case let .object(pairs) = self { return pairs.first { $0.0 == key }?.1 }
        return nil
    }

    /// qemu's pretty style: four-space indent, `"key": value`.
    public func pretty(indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent + 4)
        let close = String(repeating: " ", count: indent)
        switch self {
        case let .array(items):
            if items.isEmpty { return "[\n\(close)]" }
            return "[\n" + items.map { pad + $0.pretty(indent: indent + 4) }.joined(separator: ",\n") + "\n\(close)]"
        case let .object(pairs):
            if pairs.isEmpty { return "{\n\(close)}" }
            return "{\n" + pairs.map { pad + JSON.quote($0.0) + ": " + $0.1.pretty(indent: indent + 4) }
                .joined(separator: ",\n") + "\n\(close)}"
        default:
            return compact()
        }
    }

    /// One line, `{ "key": value, ... }` spacing as qemu-img map prints its entries.
    public func compact() -> String {
        switch self {
        case .null: return "null"
        case let .bool(b): return b ? "true" : "false"
        case let .int(i): return String(i)
        case let .uint(u): return String(u)
        case let .double(d): return String(d)
        case let .string(s): return JSON.quote(s)
        case let .array(items): return "[" + items.map { $0.compact() }.joined(separator: ", ") + "]"
        case let .object(pairs):
            return "{ " + pairs.map { JSON.quote($0.0) + ": " + $0.1.compact() }.joined(separator: ", ") + "}"
        }
    }

    public static func quote(_ s: String) -> String {
        // Works on UTF-8 bytes: escapes are all ASCII, and a forged image can carry long names (fuzzing found the
        // per-scalar version to dominate the inspection of such inputs).
        let utf8 = s.utf8
        if !utf8.contains(where: { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }) {
            return "\"" + s + "\""
        }
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        let backslash = UInt8(ascii: "\\")
        var out: [UInt8] = [UInt8(ascii: "\"")]
        out.reserveCapacity(utf8.count * 2 + 2)
        for b in utf8 {
            switch b {
            case UInt8(ascii: "\""), backslash: out.append(backslash); out.append(b)
            case 0x0a: out.append(backslash); out.append(UInt8(ascii: "n"))
            case 0x0d: out.append(backslash); out.append(UInt8(ascii: "r"))
            case 0x09: out.append(backslash); out.append(UInt8(ascii: "t"))
            case 0..<0x20:
                out.append(backslash); out.append(UInt8(ascii: "u")); out.append(UInt8(ascii: "0")); out.append(UInt8(ascii: "0"))
                out.append(hex[Int(b >> 4)]); out.append(hex[Int(b & 15)])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
        return String(decoding: out, as: UTF8.self)
    }
}
