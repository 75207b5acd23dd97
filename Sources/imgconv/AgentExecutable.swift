import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// `imgconv agent|cache|disk ...` run the `imgconv-agent` executable installed next to `imgconv` (exec: the same
/// process, pid and signals), so a conversion never loads the agent's code. These stand-ins only put the
/// commands in `imgconv --help`; their own help comes from `imgconv-agent`.
enum AgentExecutable {
    static let commands: Set<String> = ["agent", "cache", "disk"]
    static let name = "imgconv-agent"

    /// Execs `imgconv-agent` with our arguments when the first is one of its commands; returns otherwise.
    static func runIfAgentCommand() {
        let args = CommandLine.arguments
        guard args.count > 1, commands.contains(args[1]) else { return }
        let path = locate()
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + args.dropFirst()).map { strdup($0) }
        argv.append(nil)
        execv(path, &argv)
        let e = errno
        IMGConv.fail("imgconv \(args[1]) runs \(path), which could not be started: \(String(cString: strerror(e))). "
                     + "Install imgconv-agent next to imgconv (both are built by `swift build`).")
    }

    /// `imgconv-agent` in the directory of this executable (/proc/self/exe), else on PATH.
    static func locate() -> String {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        if n > 0 {
            let me = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let slash = me.lastIndex(of: "/") {
                let sibling = String(me[..<slash]) + "/" + name
                if access(sibling, X_OK) == 0 { return sibling }
            }
        }
        for dir in (getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin").split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return name
    }
}

/// Help stand-ins for the commands `imgconv-agent` runs.
struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the image agent: verified Glance pre-cache and the control API on a Unix socket (imgconv-agent).")
}

struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache", abstract: "Talk to a running agent about its image cache (imgconv-agent).")
}

struct DiskCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disk", abstract: "Ask a running agent for instance disks (imgconv-agent).")
}
