import ArgumentParser
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// `imgconv-agent`: the agent and the commands that talk to it (`agent`, `cache`, `disk`). A separate executable
/// from `imgconv`, which runs it for those commands (exec, same process), so that `imgconv convert` maps none of
/// the agent's code: no HTTP server, SQLite, NIO or Foundation (measured peak RSS of a conversion: 23 MiB alone,
/// 35 MiB in one executable).
@main
struct AgentMain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "imgconv",
        abstract: "The imgconv agent: verified Glance pre-cache, instance disks and their control API.",
        subcommands: [AgentCommand.self, CacheCommand.self, DiskCommand.self]
    )

    static func main() async {
        do {
            var command = try parseAsRoot()
            if !(command is AgentCommand) {
                LoggingSystem.bootstrap { label in
                    var h = StreamLogHandler.standardError(label: label)
                    h.logLevel = .warning
                    return h
                }
            }
            if var async = command as? AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
        } catch let e as ExitCode {
            Glibc.exit(e.rawValue)
        } catch let e as ValidationError {
            fail(e.message)
        } catch {
            exit(withError: error)
        }
    }

    static func fail(_ message: String, code: Int32 = 1) -> Never {
        writeStderr("imgconv: \(message)\n")
        Glibc.exit(code)
    }
}

func writeStderr(_ s: String) {
    var s = s
    s.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}
