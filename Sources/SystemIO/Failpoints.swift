#if canImport(Glibc)
import Glibc
#endif

/// Fault injection for tests (FreeBSD's fail points, TiKV's fail-rs): `IMGCONV_FAILPOINTS=name=sleep:SECONDS,...`
/// in the environment makes the code at `Failpoints.hit(name)` sleep there, so a test can stop a process inside a
/// window that is otherwise milliseconds wide (a base builder between its last lease renewal and its publication).
/// Unset, a hit costs one dictionary lookup. Nothing else is ever injected.
public enum Failpoints {
    static let table: [String: Double] = {
        guard let raw = getenv("IMGCONV_FAILPOINTS") else { return [:] }
        var out: [String: Double] = [:]
        for item in String(cString: raw).split(separator: ",") {
            let kv = item.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, kv[1].hasPrefix("sleep:"), let s = Double(kv[1].dropFirst(6)), s >= 0, s <= 600 else { continue }
            out[String(kv[0])] = s
        }
        return out
    }()

    /// Sleeps (blocking: call it from the executor) if the failpoint is set; returns the seconds slept.
    @discardableResult
    public static func hit(_ name: String) -> Double {
        guard let s = table[name] else { return 0 }
        let line = "imgconv: failpoint \(name): sleeping \(s) s\n"
        line.withCString { _ = write(2, $0, strlen($0)) }
        usleep(UInt32(s * 1_000_000))
        return s
    }
}
