import Cache
import Convert
import Foundation
import Glance
import ImageFormats
import Logging
import SystemIO

/// Instance disks as local files, Nova's default `images_type = qcow2` layout:
/// `<instances>/<instance_uuid>/disk`, a qcow2 overlay whose backing file is the raw base
/// `<instances>/_base/<image_id>` (backing format raw, so nothing ever probes it), and `disk.info` beside it
/// (`{"<path>": "qcow2"}`, as Nova writes it) when there is none yet.
///
/// The instance directory is Nova's (libvirt.xml, console.log, disk.config live there). The backend touches only
/// what it made: removing a disk removes `disk`, and `disk.info` only if the agent wrote it and it still says
/// what the agent wrote (its record is in the agent's state directory, not in Nova's); the directory goes only
/// when that leaves it empty.
///
/// The base is made once per image from the verified, inspected cache entry: a hard link when the cache holds it
/// raw on the same file system (eviction then only drops the cache's name), otherwise a sparse raw conversion.
/// Every file operation runs on the executor.
public final class LocalBackend: DiskBackend, @unchecked Sendable {
    public let name = "local"
    public let instancesDir: String
    /// Where the backend records what it wrote into Nova's directories.
    let recordsDir: String
    let logger: Logger
    private let builds = BaseBuilds()

    public init(instancesDir: String, stateDir: String, logger: Logger = Logger(label: "imgconv.disks.local")) {
        self.instancesDir = instancesDir
        self.recordsDir = stateDir + "/local-disks"
        self.logger = logger
    }

    var baseDir: String { instancesDir + "/_base" }
    func basePath(_ imageID: String) -> String { "\(baseDir)/\(imageID)" }
    func instanceDir(_ name: String) -> String { "\(instancesDir)/\(name.dropLast(5))" }
    func diskPath(_ name: String) -> String { instanceDir(name) + "/disk" }
    func recordPath(_ name: String) -> String { "\(recordsDir)/\(name.dropLast(5)).json" }

    /// What the agent wrote for one disk.
    struct Record: Codable {
        /// The exact disk.info the agent wrote, if it wrote one.
        var diskInfo: String?
    }

    public func create(_ request: DiskRequest, image: GlanceImage, cache: ImageCache, source: any ImageSource) async throws -> DiskInfo {
        let started = ContinuousClock.now
        let name = request.diskName
        let path = diskPath(name)
        if try await offload(.calls, { FileSystem.exists(path) }) { throw DiskError.exists(name) }
        let (base, built, written) = try await builds.run(image.id) { try await self.makeBase(image, cache: cache) }
        let dir = instanceDir(name), records = recordsDir, record = recordPath(name)
        let info = try await offload { () throws -> DiskInfo in
            guard let virtualSize = FileSystem.fileSize(base) else { throw DiskError.io("cannot stat '\(base)'") }
            let size = request.size ?? virtualSize
            guard size >= virtualSize else { throw DiskError.sizeTooSmall(requested: size, virtualSize: virtualSize) }
            try FileSystem.makeDirectory(dir, mode: 0o755)
            var o = QCOW2Sink.Options()
            o.backingFile = base
            o.backingFormat = "raw"
            let sink = try QCOW2Sink(path: path, options: o)
            do {
                try sink.begin(virtualSize: size)
                try sink.finish()
            } catch {
                sink.abort()
                _ = try? FileSystem.removeDirectoryIfEmpty(dir)
                throw error
            }
            // disk.info, as Nova's Qcow2 backend writes it, if Nova has not written one.
            var rec = Record()
            let diskInfoPath = dir + "/disk.info"
            if !FileSystem.exists(diskInfoPath) {
                let text = "{\"\(path)\": \"qcow2\"}"
                try FileSystem.writeAtomically(diskInfoPath, Array(text.utf8), mode: 0o644)
                rec.diskInfo = text
            }
            try FileSystem.makeDirectory(records, mode: 0o700)
            try FileSystem.writeAtomically(record, Array(try JSONEncoder().encode(rec)), mode: 0o600)
            return try Self.overlayInfo(name, path: path)
        }
        var result = info
        result.imageID = image.id
        result.method = built ? .baseBuilt : .baseReused
        result.bytesWritten = written
        result.seconds = started.duration(to: .now).seconds
        return result
    }

    /// The raw base of `image`, made if missing: (path, made here, bytes written).
    func makeBase(_ image: GlanceImage, cache: ImageCache) async throws -> (String, Bool, UInt64) {
        let base = basePath(image.id), baseDir = self.baseDir
        if try await offload(.calls, { FileSystem.exists(base) }) { return (base, false, 0) }
        try await offload { try FileSystem.makeDirectory(baseDir, mode: 0o755) }
        let cached = try await cache.acquire(image.id)
        defer { Task { await cache.release(image.id) } }
        guard let source = cached.path else { throw DiskError.io("image \(image.id) is cached without a file") }
        let format = ImageFormat(rawValue: cached.storedFormat ?? cached.diskFormat) ?? .raw
        if format == .raw, try await offload(.calls, { link(source, base) == 0 }) { return (base, true, 0) }
        let written = try await offload(.jobs) { token throws -> UInt64 in
            let (verdict, opened) = ImageInspector.inspect(path: source, declared: format)
            guard verdict.safe, let opened else { throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description)) }
            let sink = try OutputSpec(format: .raw).makeSink(path: base)
            do {
                return try Converter(options: .background, cancel: { token.isCancelled }).convert(opened, to: sink).bytesWritten
            } catch SinkError.cancelled {
                throw CancellationError()
            }
        }
        logger.info("local base ready", metadata: ["base": "\(base)", "from": "\(source)"])
        return (base, true, written)
    }

    /// Reads our own overlay's header directly (the inspector rightly refuses images with backing files).
    static func overlayInfo(_ name: String, path: String) throws -> DiskInfo {
        guard let h = FileSystem.readPrefix(path, count: 4096) else { throw DiskError.notFound(name) }
        guard h.count >= 72, h[0..<4] == [0x51, 0x46, 0x49, 0xfb] else { throw DiskError.io("'\(path)' is not a qcow2 overlay") }
        func be(_ at: Int, _ n: Int) -> UInt64 { h[at..<(at + n)].reduce(0) { $0 << 8 | UInt64($1) } }
        let off = Int(be(8, 8)), len = Int(be(16, 4))
        let parent = off > 0 && off + len <= h.count ? String(decoding: h[off..<(off + len)], as: UTF8.self) : nil
        let imageID = parent.map { String($0.split(separator: "/").last ?? "") }
        return DiskInfo(name: name, backend: "local", location: path, size: be(24, 8), parent: parent, imageID: imageID)
    }

    public func list() async throws -> [DiskInfo] {
        let dir = instancesDir
        return try await offload {
            FileSystem.list(dir).sorted().compactMap { e in
                let name = e + "_disk"
                guard (try? DiskService.validateName(name)) != nil else { return nil }
                return try? Self.overlayInfo(name, path: "\(dir)/\(e)/disk")
            }
        }
    }

    public func get(_ name: String) async throws -> DiskInfo {
        try DiskService.validateName(name)
        let path = diskPath(name)
        return try await offload { try Self.overlayInfo(name, path: path) }
    }

    /// Removes `disk`, then `disk.info` if the agent wrote it and it is unchanged, then the instance directory if
    /// that left it empty. Nova's files stay.
    public func remove(_ name: String) async throws {
        try DiskService.validateName(name)
        let path = diskPath(name), dir = instanceDir(name), record = recordPath(name)
        try await offload {
            guard FileSystem.exists(path) else { throw DiskError.notFound(name) }
            let parent = (try? Self.overlayInfo(name, path: path))?.parent
            try FileSystem.remove(path)
            let rec = FileSystem.read(record).flatMap { try? JSONDecoder().decode(Record.self, from: Data($0)) }
            let diskInfoPath = dir + "/disk.info"
            if let wrote = rec?.diskInfo, FileSystem.read(diskInfoPath) == Array(wrote.utf8) {
                try FileSystem.remove(diskInfoPath)
            }
            try FileSystem.remove(record)
            try FileSystem.removeDirectoryIfEmpty(dir)
            if let parent { utime(parent, nil) }
        }
    }

    public func flatten(_ name: String) async throws -> DiskInfo {
        try DiskService.validateName(name)
        throw DiskError.busy("flatten is an RBD operation; a local overlay is flattened with the instance stopped (qemu-img rebase -b '')")
    }

    /// Bases no overlay names, untouched (mtime) for `idleSeconds`.
    public func collectGarbage(idleSeconds: Double, images: Set<String>?) async throws -> [String] {
        let inUse = Set(try await list().compactMap(\.parent))
        let baseDir = self.baseDir
        return try await offload {
            var removed: [String] = []
            let now = Date()
            for e in FileSystem.list(baseDir) {
                if let images, !images.contains(e) { continue }
                let path = "\(baseDir)/\(e)"
                guard !inUse.contains(path), let attrs = try? FileManager.default.attributesOfItem(atPath: path),
                      let mtime = attrs[.modificationDate] as? Date, now.timeIntervalSince(mtime) >= idleSeconds else { continue }
                if (try? FileSystem.remove(path)) != nil { removed.append(e) }
            }
            return removed
        }
    }
}

/// One base build per image in this process; later callers wait for it.
actor BaseBuilds {
    private var running: [String: Task<(String, Bool, UInt64), Error>] = [:]

    func run(_ id: String, _ body: @escaping @Sendable () async throws -> (String, Bool, UInt64)) async throws -> (String, Bool, UInt64) {
        if let t = running[id] {
            let (path, _, _) = try await t.value
            return (path, false, 0)
        }
        let t = Task { try await body() }
        running[id] = t
        defer { running[id] = nil }
        return try await t.value
    }
}
