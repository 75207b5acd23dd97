import Foundation
import Testing

/// Runs a command and returns its exit status and output.
@discardableResult
func run(_ args: [String], allowFailure: Bool = false) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    // Read before waiting so a large output cannot fill the pipe and stall the child.
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let result = (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    if !allowFailure && result.0 != 0 {
        Issue.record("command failed (\(result.0)): \(args.joined(separator: " "))\n\(result.2)")
    }
    return result
}

/// qemu-img is the oracle. CI installs it and sets IMGCONV_REQUIRE_QEMU=1, so a missing qemu-img fails there
/// instead of silently skipping the suite.
let qemuAvailable: Bool = {
    let found = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img")
    if !found && ProcessInfo.processInfo.environment["IMGCONV_REQUIRE_QEMU"] == "1" {
        fatalError("IMGCONV_REQUIRE_QEMU=1 but /usr/bin/qemu-img is missing: apt-get install qemu-utils")
    }
    return found
}()

/// A fresh directory for one test.
func temporaryDirectory(_ tag: String) throws -> String {
    let dir = NSTemporaryDirectory() + "imgconv-oracle-\(tag)-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// The built `imgconv` binary, next to the test bundle.
let imgconvBinary: String = {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("imgconv").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    let fallback = FileManager.default.currentDirectoryPath + "/.build/debug/imgconv"
    return fallback
}()

func sha256(_ path: String) throws -> String {
    String(try run(["sha256sum", path]).out.prefix(64))
}

func parseJSON(_ text: String) throws -> Any {
    try JSONSerialization.jsonObject(with: Data(text.utf8))
}

/// Writes the mixed-content base disk every oracle image is made from: patterned data, text, pseudo-random
/// bytes, explicit zeros, unaligned sectors and holes, `size` bytes long (odd sizes welcome).
func writeBaseImage(_ path: String, size: Int) throws {
    FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.truncate(atOffset: UInt64(size))
    func put(_ offset: Int, _ bytes: [UInt8]) throws {
        guard offset + bytes.count <= size else { return }
        try h.seek(toOffset: UInt64(offset))
        h.write(Data(bytes))
    }
    let mib = 1 << 20
    try put(0, (0..<65536).map { UInt8(truncatingIfNeeded: $0 * 7 % 251 + 1) })
    try put(mib, Array(String(repeating: "imgconv oracle: the quick brown fox jumps over the lazy dog\n", count: 70).utf8))
    var x: UInt64 = 0x9e37_79b9_7f4a_7c15
    try put(2 * mib, (0..<mib).map { _ in
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    })
    try put(3 * mib, [UInt8](repeating: 0, count: 65536))  // allocated zeros: must come out as a hole
    try put(5 * mib + 512, [UInt8](repeating: 0x5a, count: 512))
    try put(7 * mib + 3 * 1024, (0..<10240).map { UInt8(truncatingIfNeeded: $0 | 1) })
    try put(size - 512, [UInt8](repeating: 0xcd, count: 512))
}
