import ArgumentParser
import Convert
import ImageFormats
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@main
struct IMGConv: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "imgconv",
        abstract: "Inspect and convert disk images (raw, qcow2, vmdk, vpc/vhd, vdi) natively and safely.",
        discussion: "Command lines and JSON follow qemu-img's, so tools that parse qemu-img can use imgconv instead.",
        subcommands: [Info.self, MapCommand.self, Check.self, ConvertCommand.self, Inspect.self, AgentCommand.self, CacheCommand.self, DiskCommand.self]
    )

    static func main() async {
        AgentExecutable.runIfAgentCommand()
        do {
            var command = try parseAsRoot()
            LoggingSystem.bootstrap { label in
                var h = StreamLogHandler.standardError(label: label)
                h.logLevel = .warning
                return h
            }
            if var async = command as? AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
        } catch let e as ExitCode {
            Glibc.exit(e.rawValue)
        } catch let e as ImageError {
            fail(e.description)
        } catch let e as SinkError {
            fail(e.description)
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

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

/// Options every reading command shares.
struct SourceOptions: ParsableArguments {
    @Option(name: .customShort("f"), help: "The format the image must be (raw, qcow2, vmdk, vpc or vhd, vdi). The command fails if the content is another format.")
    var format: String?

    @Flag(name: .customLong("allow-extent-files"),
          help: "Open the extent files a VMDK descriptor names (only plain names in the descriptor's directory). Off by default: a hostile descriptor can name any host file.")
    var allowExtentFiles = false

    @Flag(name: .customShort("U"), help: "Accepted for qemu-img compatibility; imgconv never locks images.")
    var forceShare = false

    @Option(name: .customLong("max-virtual-size"), help: "The largest virtual size accepted (default 64T); larger images are refused before any table is read.")
    var maxVirtualSize: String = "64T"

    var openOptions: OpenOptions {
        get throws {
            var o = OpenOptions()
            o.allowVMDKExtentFiles = allowExtentFiles
            var text = maxVirtualSize.uppercased()
            var shift: UInt64 = 0
            if let u = text.last, let s = ["K": 10, "M": 20, "G": 30, "T": 40, "P": 50][u] { shift = UInt64(s); text.removeLast() }
            guard let v = UInt64(text), v > 0, v <= (UInt64.max >> shift) else {
                throw ValidationError("--max-virtual-size \(maxVirtualSize): expected a size such as 64T or 500G")
            }
            o.maxVirtualSize = v << shift
            return o
        }
    }

    var declared: ImageFormat? { get throws { try format.map { try ImageFormat(name: $0) } } }

    func open(_ path: String) throws -> any DiskImage {
        try ImageOpener.open(path: path, declared: try declared, options: try openOptions)
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show an image's format, sizes and format-specific details.")
    @OptionGroup var source: SourceOptions
    @Option(name: .customLong("output"), help: "human or json (qemu-img info --output=json's keys).")
    var output: OutputFormat = .human
    @Argument(help: "The image file.") var file: String

    func run() throws {
        // The inspection opens the image; open it here only when the inspection could not (to report why).
        let (verdict, opened) = ImageInspector.inspect(path: file, declared: try source.declared, options: try source.openOptions)
        var info: ImageInfo
        if let foreign = verdict.foreign, try source.declared == nil {
            // A format imgconv recognises but does not read: named as qemu-img names it, and unsafe.
            info = foreign.info(filename: file, actualSize: try? FileStorage(path: file).allocatedBytes)
        } else {
            info = try (opened ?? source.open(file)).info()
        }
        info.filename = file
        switch output {
        case .json:
            // qemu-img's keys, plus "safety": a tool that parses qemu-img's JSON ignores it.
            guard case var .object(pairs) = info.json else { return }
            pairs.append(("safety", verdict.json))
            print(JSON.object(pairs).pretty())
        case .human:
            print(info.human, terminator: "")
            print("safety: " + (verdict.safe ? "safe" : "UNSAFE"))
            for r in verdict.reasons { print("    \(r)") }
        }
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Decide whether an image is safe to convert: the inspection every conversion runs first.",
        discussion: "Exit 0 when safe, 4 when unsafe (each reason on its own line), 1 when the file cannot be read.")
    @OptionGroup var source: SourceOptions
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @Argument(help: "The image file.") var file: String

    func run() throws {
        let (v, _) = ImageInspector.inspect(path: file, declared: try source.declared, options: try source.openOptions)
        switch output {
        case .json:
            var pairs: [(String, JSON)] = [("filename", .string(file))]
            if let f = v.formatName { pairs.append(("format", .string(f))) }
            if let s = v.virtualSize { pairs.append(("virtual-size", .uint(s))) }
            pairs.append(("signatures", .array(v.signatures.map { .string($0) })))
            pairs.append(("safety", v.json))
            print(JSON.object(pairs).pretty())
        case .human:
            print("\(file): \(v.formatName ?? "unknown")" + (v.virtualSize.map { ", \($0) bytes" } ?? "") + ": "
                  + (v.safe ? "safe" : "UNSAFE"))
            for r in v.reasons { print("    \(r)") }
        }
        if v.reasons.contains(where: { $0.code == "unreadable" }) { throw ExitCode(1) }
        if !v.safe { throw ExitCode(4) }
    }
}

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Show the allocation map: data, zero and unallocated runs.")
    @OptionGroup var source: SourceOptions
    @Option(name: .customLong("output"), help: "human or json (qemu-img map --output=json's shape).")
    var output: OutputFormat = .human
    @Argument(help: "The image file.") var file: String

    func run() throws {
        let image = try source.open(file)
        let extents = try image.allExtents()
        switch output {
        case .json:
            let lines = extents.map { e -> String in
                var p: [(String, JSON)] = [
                    ("start", .uint(e.start)), ("length", .uint(e.length)), ("depth", .int(0)),
                    ("present", .bool(e.status != .unallocated)), ("zero", .bool(e.status != .data)),
                    ("data", .bool(e.status == .data)),
                ]
                if let h = e.hostOffset { p.append(("offset", .uint(h))) }
                return JSON.object(p).compact()
            }
            print("[" + lines.joined(separator: ",\n") + "]")
        case .human:
            func hex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
            func col(_ s: String) -> String { s.count >= 16 ? s + " " : s + String(repeating: " ", count: 16 - s.count) }
            print("Offset          Length          Mapped to       File")
            for e in extents where e.status == .data {
                guard let h = e.hostOffset else { continue }
                let name = e.file == 0 ? file : image.files[e.file].name
                print(col(hex(e.start)) + col(hex(e.length)) + col(hex(h)) + name)
            }
        }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check an image's metadata for consistency.",
        discussion: "Exit codes as qemu-img check: 0 clean, 2 corrupt, 3 leaked clusters only, 1 the check failed.")
    @OptionGroup var source: SourceOptions
    @Option(name: .customLong("output"), help: "human or json.")
    var output: OutputFormat = .human
    @Argument(help: "The image file.") var file: String

    func run() throws {
        let image: any DiskImage
        var result: CheckResult
        do {
            image = try source.open(file)
            result = try image.check()
        } catch let e as ImageError {
            // Metadata so broken that the image cannot be opened or walked is a corruption, not a tool error,
            // unless it is an I/O error or a refusal.
            switch e {
            case .io, .unknownFormatName, .formatMismatch, .externalFile, .unsupported, .unsupportedFormat: throw e
            default:
                let fmt = (try? source.format.map { try ImageFormat(name: $0) }) ?? nil
                result = CheckResult(filename: file, format: fmt ?? .raw)
                result.corruption(e.description)
            }
        }
        result.filename = file
        switch output {
        case .json: print(result.json.pretty())
        case .human: print(result.human, terminator: "")
        }
        if result.exitCode != 0 { throw ExitCode(result.exitCode) }
    }
}

/// Set by SIGINT/SIGTERM; the converter polls it between chunks and then removes its partial output.
let interrupted = Atomic<Bool>(false)

func onInterrupt(_: Int32) { interrupted.store(true, ordering: .relaxed) }

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Convert an image to any format; holes and zero runs are never read or written.",
        discussion: "Spelled as qemu-img convert. The output is written under a temporary name, fsynced and renamed at the end (unless -n): SIGINT or an error leaves nothing behind.")
    @OptionGroup var source: SourceOptions
    @Option(name: .customShort("O"), help: "Output format: raw, qcow2, vmdk, vpc (vhd) or vdi.") var outputFormat: String = "raw"
    @Option(name: .customShort("o"), help: "Output options key=value,... (raw: preallocation; qcow2: compat, cluster_size, compression_type, refcount_bits, lazy_refcounts; vmdk: subformat; vpc: subformat, force_size; vdi: static).")
    var outputOptions: [String] = []
    @Flag(name: .customShort("c"), help: "Compress the output (qcow2; vmdk streamOptimized).") var compress = false
    @Option(name: .customShort("S"), help: "Zero-detection granularity for raw output (default 4k; 0 disables).")
    var sparseSize: String = "4k"
    @Option(name: .customShort("m"), help: "Worker threads (default: the number of cores, at most 8).") var workers: Int?
    @Flag(name: .customShort("W"), help: "Accepted for qemu-img compatibility: writes are always out of order internally and in order on disk.")
    var outOfOrder = false
    @Flag(name: .customShort("n"), help: "Write into the existing target (raw only) instead of creating it.") var noCreate = false
    @Flag(name: .customLong("target-is-zero"), help: "With -n: the target already reads as zeros, so skipped ranges are not zeroed.")
    var targetIsZero = false
    @Option(name: .customShort("t"), help: "Target cache mode: none (default: data written with O_DIRECT where the file system takes it, then fsync before the rename, so a crash never leaves a half-written image in place), writeback (through the page cache, fsync before the rename) or unsafe (page cache, no fsync, as qemu-img convert's default; the rename is still atomic).")
    var cacheMode: String = "none"
    @Flag(name: .customShort("p"), help: "Show a progress bar on a terminal.") var progress = false
    @Option(name: .customLong("progress"), help: "json: one JSON line per percent on standard error, for the agent.")
    var progressFormat: String?
    @Flag(name: .customLong("trusted"), help: "Convert even if the inspection finds the image unsafe (for trusted local files). Backing files, data files and parents are still never opened.")
    var trusted = false
    @Flag(name: .customLong("no-clone"), help: "Copy every byte. By default, on a file system that shares extents (XFS, btrfs), raw output shares the blocks the source stores as they are (as cp --reflink does) instead of reading and writing them.")
    var noClone = false
    @Flag(name: .customShort("C"), help: "Share blocks with the source for qcow2, vpc and vdi output too (qemu-img's copy offloading). Shared data is not zero-detected, so all-zero data of the source stays allocated in the output.")
    var copyOffload = false
    @Argument(help: "The source image.") var src: String
    @Argument(help: "The output file.") var dst: String

    func run() throws {
        var spec = OutputSpec(format: try ImageFormat(name: outputFormat))
        for o in outputOptions { spec.options.merge(try OutputSpec.parseOptions(o)) { $1 } }
        spec.compress = compress
        spec.zeroGranularity = try OutputSpec.parseSize(sparseSize)
        spec.inPlace = noCreate
        // Raw output shares blocks by default (zeros cost nothing there); image formats only with -C, where
        // sharing trades their compactness (the zeros a copy would skip stay allocated) for time.
        spec.copyOffload = copyOffload
        switch cacheMode {
        case "none", "directsync": spec.durable = true; spec.direct = true
        case "writeback", "writethrough": spec.durable = true; spec.direct = false
        case "unsafe": spec.durable = false; spec.direct = false
        default: throw SinkError.invalidOption("-t \(cacheMode) (none, writeback or unsafe)")
        }
        if targetIsZero && !noCreate { throw SinkError.invalidOption("--target-is-zero needs -n") }
        if let p = progressFormat, p != "json" { throw SinkError.invalidOption("--progress=\(p) (only json)") }
        var options = ConvertOptions()
        if let workers { options.workers = workers }
        options.zeroSkippedRanges = noCreate && !targetIsZero
        if noClone && copyOffload { throw SinkError.invalidOption("-C and --no-clone contradict each other") }
        options.cloneExtents = !noClone
        var sink = try spec.makeSink(path: dst)
        // Every image is hostile until inspected. The cheap checks (format, features, bounds) run first; the
        // structural walk of every table runs alongside the copy and gates the rename (GatedSink).
        let image: any DiskImage
        if trusted {
            image = try source.open(src)
        } else {
            let (verdict, opened) = ImageInspector.inspect(path: src, declared: try source.declared, options: try source.openOptions,
                                                           structural: noCreate)
            guard verdict.safe, let opened else {
                let lines = verdict.reasons.map { "  \($0)" }.joined(separator: "\n")
                throw SinkError.unsupportedOutput("refusing to convert '\(src)': the image is not safe:\n\(lines)\n"
                                                  + "(--trusted converts a trusted local file anyway)")
            }
            image = opened
            // With -n the target is written in place, so nothing can be held back: check everything first.
            if !noCreate { sink = GatedSink(sink, gate: GatedSink.structuralCheck(of: opened, name: src)) }
        }
        // Catch SIGINT/SIGTERM, and unblock them: a parent may have started us with them blocked.
        signal(SIGINT, onInterrupt)
        signal(SIGTERM, onInterrupt)
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        let reporter = Self.reporter(bar: progress && isatty(2) != 0, json: progressFormat == "json")
        let converter = try Converter(options: options, cancel: { interrupted.load(ordering: .relaxed) }, progress: reporter)
        let stats = try converter.convert(image, to: sink)
        if progress && isatty(2) != 0 { writeStderr("    (100.00/100%)\n") }
        if progressFormat == "json" {
            let j = JSON.object([("event", .string("done")), ("virtual-size", .uint(stats.virtualSize)),
                                 ("bytes-read", .uint(stats.bytesRead)), ("bytes-written", .uint(stats.bytesWritten))])
            writeStderr(j.compact() + "\n")
        }
    }

    /// A progress callback: qemu's bar on a terminal, or JSON lines (each whole percent) for the agent.
    static func reporter(bar: Bool, json: Bool) -> (@Sendable (UInt64, UInt64) -> Void)? {
        guard bar || json else { return nil }
        let last = Atomic<Int>(-1)
        return { done, total in
            let pct = total == 0 ? 100.0 : Double(done) * 100 / Double(total)
            if bar { writeStderr("    (\(fmt2(pct))/100%)\r") }
            if json && last.exchange(Int(pct), ordering: .relaxed) != Int(pct) {
                let j = JSON.object([("event", .string("progress")), ("done", .uint(done)), ("total", .uint(total)),
                                     ("percent", .double((pct * 100).rounded() / 100))])
                writeStderr(j.compact() + "\n")
            }
        }
    }
}

