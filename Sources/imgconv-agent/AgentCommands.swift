import Agent
import ArgumentParser
import AsyncHTTPClient
import Foundation
import ImageFormats
import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// `imgconv agent --config FILE`: the prefetch daemon and control API, in the foreground.
struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the image agent: verified Glance pre-cache and the control API on a Unix socket.",
        discussion: "Runs in the foreground until SIGTERM or SIGINT, which abort running fetches cleanly and remove the socket.")

    @Option(help: "The agent's INI config file (nova.conf style).") var config: String = "/etc/imgconv/agent.conf"
    @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let cfg: AgentConfig
        do {
            cfg = try AgentConfig.load(path: config)
        } catch let e as ConfigError {
            AgentMain.fail("\(e.message)", code: 2)
        }
        do {
            try await AgentRunner.run(config: cfg, logger: Logger(label: "imgconv.agent"))
        } catch {
            AgentMain.fail("\(error)")
        }
    }
}

/// `imgconv cache ...`: talks to a running agent over its control socket.
struct CacheCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache",
        abstract: "List, fetch, pin and evict images in a running agent's cache.",
        subcommands: [List.self, Status.self, Fetch.self, Pin.self, Unpin.self, Evict.self, Verify.self])

    struct SocketOption: ParsableArguments {
        @Option(help: "The agent's control socket.") var socket: String =
            ProcessInfo.processInfo.environment["IMGCONV_SOCKET"] ?? "/run/imgconv/agent.sock"
        @Flag(help: "Print the agent's JSON.") var json = false
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the cached images.")
        @OptionGroup var options: SocketOption
        func run() async throws {
            let (_, body) = try await ControlClient(options.socket).call("GET", "/v1/images")
            if options.json { print(String(decoding: body, as: UTF8.self)); return }
            let images = ((try? JSONSerialization.jsonObject(with: body)) as? [String: Any])?["images"] as? [[String: Any]] ?? []
            print(pad("IMAGE", 36), pad("STATE", 10), pad("FORMAT", 7), pad("DISK", 10), pad("PINNED", 6), "NAME")
            for i in images {
                print(pad(i["id"] as? String ?? "", 36), pad(i["state"] as? String ?? "", 10), pad(i["stored_format"] as? String ?? "-", 7),
                      pad(humanSize((i["disk_bytes"] as? NSNumber)?.uint64Value ?? 0), 10),
                      pad((i["pinned"] as? Bool ?? false) ? "yes" : "no", 6), i["name"] as? String ?? "")
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one image's state.")
        @OptionGroup var options: SocketOption
        @Argument var id: String
        func run() async throws {
            try await ControlClient(options.socket).printCall("GET", "/v1/images/\(escape(id))")
        }
    }

    struct Fetch: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Ask the agent to cache an image.")
        @OptionGroup var options: SocketOption
        @Flag(help: "Wait until the image is ready, showing progress; exit non-zero if the fetch fails.") var wait = false
        @Argument var id: String
        func run() async throws {
            let client = ControlClient(options.socket)
            let (status, body) = try await client.call("PUT", "/v1/images/\(escape(id))")
            let o = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] ?? [:]
            if status == 200 || !wait {
                print(String(decoding: body, as: UTF8.self))
                return
            }
            guard let jobID = o["id"] as? String else { AgentMain.fail("unexpected answer: \(String(decoding: body, as: UTF8.self))") }
            let tty = isatty(2) != 0
            var lastLine = ""
            while true {
                let (s, b) = try await client.call("GET", "/v1/jobs/\(jobID)")
                guard s == 200, let job = (try? JSONSerialization.jsonObject(with: b)) as? [String: Any] else {
                    AgentMain.fail("lost the job \(jobID): \(String(decoding: b, as: UTF8.self))")
                }
                let state = job["state"] as? String ?? "?"
                let done = (job["bytes_done"] as? NSNumber)?.uint64Value ?? 0
                let total = (job["bytes_total"] as? NSNumber)?.uint64Value ?? 0
                let pct = total > 0 ? String(format: "%.1f%%", Double(done) * 100 / Double(total)) : "-"
                let line = "\(state) \(humanSize(done)) / \(humanSize(total)) (\(pct))"
                if line != lastLine {
                    writeStderr(tty ? "\r\u{1b}[K" + line : line + "\n")
                    lastLine = line
                }
                if state == "ready" {
                    if tty { writeStderr("\n") }
                    let (_, img) = try await client.call("GET", "/v1/images/\(escape(id))")
                    print(String(decoding: img, as: UTF8.self))
                    return
                }
                if state == "error" {
                    if tty { writeStderr("\n") }
                    AgentMain.fail("fetch of \(id) failed: \(job["error"] as? String ?? "unknown error")")
                }
                try await Task.sleep(nanoseconds: 200_000_000)
            }
        }
    }

    struct Pin: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pin an image: never evicted.")
        @OptionGroup var options: SocketOption
        @Argument var id: String
        func run() async throws {
            try await ControlClient(options.socket).printCall("PUT", "/v1/images/\(escape(id))/pin")
        }
    }

    struct Unpin: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Unpin an image.")
        @OptionGroup var options: SocketOption
        @Argument var id: String
        func run() async throws {
            try await ControlClient(options.socket).printCall("DELETE", "/v1/images/\(escape(id))/pin")
        }
    }

    struct Evict: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove an image from the cache.")
        @OptionGroup var options: SocketOption
        @Argument var id: String
        func run() async throws {
            _ = try await ControlClient(options.socket).call("DELETE", "/v1/images/\(escape(id))")
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Re-verify a cached image against Glance's hashes now.")
        @OptionGroup var options: SocketOption
        @Argument var id: String
        func run() async throws {
            try await ControlClient(options.socket).printCall("POST", "/v1/images/\(escape(id))/verify")
        }
    }
}

struct DiskCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disk",
        abstract: "Create, list, flatten and remove instance boot disks through a running agent.",
        subcommands: [Create.self, List.self, Remove.self, Flatten.self, GC.self])
    typealias SocketOption = CacheCommand.SocketOption

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make <instance_uuid>_disk from a Glance image: an RBD clone, or a local qcow2 overlay.")
        @OptionGroup var options: SocketOption
        @Option(help: "Disk size (bytes, or 20G, 512M); default: the image's virtual size.") var size: String?
        @Argument(help: "The instance's UUID.") var instance: String
        @Argument(help: "The Glance image id.") var image: String
        func run() async throws {
            var o: [String: Any] = ["instance_uuid": instance, "image_id": image]
            if let size {
                guard let n = try? AgentConfig.size(size) else { AgentMain.fail("--size '\(size)' is not a size such as 20G") }
                o["size"] = n
            }
            let body = try JSONSerialization.data(withJSONObject: o)
            let (_, answer) = try await ControlClient(options.socket).call("POST", "/v1/disks", body: body, timeout: 4 * 3600)
            print(String(decoding: answer, as: UTF8.self))
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List instance disks.")
        @OptionGroup var options: SocketOption
        func run() async throws {
            let (_, body) = try await ControlClient(options.socket).call("GET", "/v1/disks")
            if options.json { print(String(decoding: body, as: UTF8.self)); return }
            let disks = ((try? JSONSerialization.jsonObject(with: body)) as? [String: Any])?["disks"] as? [[String: Any]] ?? []
            print(pad("DISK", 42), pad("SIZE", 10), "PARENT")
            for d in disks {
                print(pad(d["name"] as? String ?? "", 42), pad(humanSize((d["size"] as? NSNumber)?.uint64Value ?? 0), 10),
                      d["parent"] as? String ?? "-")
            }
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove an instance disk.")
        @OptionGroup var options: SocketOption
        @Argument(help: "<instance_uuid>_disk") var name: String
        func run() async throws {
            _ = try await ControlClient(options.socket).call("DELETE", "/v1/disks/\(escape(name))")
        }
    }

    struct Flatten: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Copy the parent's data into an RBD clone and detach it.")
        @OptionGroup var options: SocketOption
        @Argument(help: "<instance_uuid>_disk") var name: String
        func run() async throws {
            let (_, body) = try await ControlClient(options.socket).call("POST", "/v1/disks/\(escape(name))/flatten", timeout: 4 * 3600)
            print(String(decoding: body, as: UTF8.self))
        }
    }

    struct GC: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "gc", abstract: "Remove shared bases that have no disks and have been idle.")
        @OptionGroup var options: SocketOption
        @Option(help: "Idle seconds (default: the agent's [disks] gc_idle).") var idle: Int?
        @Argument(help: "Only the bases of these Glance image ids (default: every base).") var images: [String] = []
        func run() async throws {
            let items = (idle.map { ["idle=\($0)"] } ?? []) + images.map { "image=\(escape($0))" }
            let q = items.isEmpty ? "" : "?" + items.joined(separator: "&")
            try await ControlClient(options.socket).printCall("POST", "/v1/bases/gc\(q)")
        }
    }
}

func escape(_ s: String) -> String {
    s.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-_."))) ?? s
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }


/// HTTP/1.1 over the agent's Unix socket. Non-2xx answers end the command with the agent's message.
struct ControlClient {
    let socket: String
    init(_ socket: String) { self.socket = socket }

    /// Calls the agent and prints its JSON answer.
    func printCall(_ method: String, _ path: String) async throws {
        let (_, body) = try await call(method, path)
        print(String(decoding: body, as: UTF8.self))
    }

    func call(_ method: String, _ path: String, body: Data? = nil, timeout: Int64 = 30) async throws -> (Int, Data) {
        let encoded = socket.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? socket
        var req = HTTPClientRequest(url: "http+unix://\(encoded)\(path)")
        req.method = .init(rawValue: method)
        if let body {
            req.headers.add(name: "Content-Type", value: "application/json")
            req.body = .bytes(ByteBuffer(bytes: body))
        }
        let http = HTTPClient.shared
        let response: HTTPClientResponse
        do {
            response = try await http.execute(req, timeout: .seconds(timeout))
        } catch {
            AgentMain.fail("cannot reach the agent on \(socket): \(error) (is `imgconv agent` running? --socket)")
        }
        let body = Data(try await response.body.collect(upTo: 64 << 20).readableBytesView)
        let code = Int(response.status.code)
        if code >= 400 {
            let o = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any]
            let message = (o?["error"] as? [String: Any])?["message"] as? String ?? String(decoding: body, as: UTF8.self)
            AgentMain.fail("\(method) \(path): HTTP \(code): \(message)")
        }
        return (code, body)
    }
}
