import SystemIO
import Cache
import Convert
import Foundation
import Glance
import ImageFormats
import Logging

/// Instance disks as local files, Nova's default `images_type = qcow2` layout:
/// `<instances>/<instance_uuid>/disk`, a qcow2 overlay whose backing file is the raw base
/// `<instances>/_base/<image_id>` (backing format raw, so nothing ever probes it).
///
/// The base is made once per image from the verified, inspected cache entry: a hard link when the cache
/// holds it raw on the same file system (eviction then only drops the cache's name), otherwise a sparse raw
/// conversion. The cache can evict its copy at any time without breaking a disk.
public final class LocalBackend: DiskBackend, @unchecked Sendable {
    public let name = "local"
    public let instancesDir: String
    let logger: Logger
    private let builds = BaseBuilds()

    public init(instancesDir: String, logger: Logger = Logger(label: "imgconv.disks.local")) {
        self.instancesDir = instancesDir
        self.logger = logger
    }

    var baseDir: String { instancesDir + "/_base" }
    func basePath(_ imageID: String) -> String { "\(baseDir)/\(imageID.lowercased())" }
    func diskPath(_ name: String) -> String { "\(instancesDir)/\(name.dropLast(5))/disk" }

    public func create(_ request: DiskRequest, image: GlanceImage, cache: ImageCache, source: any ImageSource) async throws -> DiskInfo {
        let started = ContinuousClock.now
        let name = request.diskName
        let path = diskPath(name)
        if FileManager.default.fileExists(atPath: path) { throw DiskError.exists(name) }
        let (base, built, written) = try await builds.run(image.id) { try await self.makeBase(image, cache: cache) }
        let virtualSize = try fileSize(base)
        let size = request.size ?? virtualSize
        guard size >= virtualSize else { throw DiskError.sizeTooSmall(requested: size, virtualSize: virtualSize) }
        try await offload {
            try FileManager.default.createDirectory(atPath: String(path.dropLast(5)), withIntermediateDirectories: true)
            var o = QCOW2Sink.Options()
            o.backingFile = base
            o.backingFormat = "raw"
            let sink = try QCOW2Sink(path: path, options: o)
            do {
                try sink.begin(virtualSize: size)
                try sink.finish()
            } catch {
                sink.abort()
                throw error
            }
        }
        var info = try overlayInfo(name)
        info.imageID = image.id
        info.method = built ? .baseBuilt : .baseReused
        info.bytesWritten = written
        info.seconds = started.duration(to: .now).seconds
        return info
    }

    func fileSize(_ path: String) throws -> UInt64 {
        guard let attrs = try? FileManager.default.attributesOfItem(atPath: path), let n = attrs[.size] as? NSNumber else {
            throw DiskError.io("cannot stat '\(path)'")
        }
        return n.uint64Value
    }

    /// The raw base of `image`, made if missing: (path, made here, bytes written).
    func makeBase(_ image: GlanceImage, cache: ImageCache) async throws -> (String, Bool, UInt64) {
        let base = basePath(image.id)
        if FileManager.default.fileExists(atPath: base) { return (base, false, 0) }
        try FileManager.default.createDirectory(atPath: baseDir, withIntermediateDirectories: true)
        let cached = try await cache.acquire(image.id)
        defer { Task { await cache.release(image.id) } }
        guard let source = cached.path else { throw DiskError.io("image \(image.id) is cached without a file") }
        let format = ImageFormat(rawValue: cached.storedFormat ?? cached.diskFormat) ?? .raw
        if format == .raw && link(source, base) == 0 { return (base, true, 0) }
        let written = try await offload { () throws -> UInt64 in
            let (verdict, opened) = ImageInspector.inspect(path: source, declared: format)
            guard verdict.safe, let opened else { throw DiskError.unsafe(id: image.id, reasons: verdict.reasons.map(\.description)) }
            let sink = try OutputSpec(format: .raw).makeSink(path: base)
            return try Converter().convert(opened, to: sink).bytesWritten
        }
        logger.info("local base ready", metadata: ["base": "\(base)", "from": "\(source)"])
        return (base, true, written)
    }

    func overlayInfo(_ name: String) throws -> DiskInfo {
        let path = diskPath(name)
        guard FileManager.default.fileExists(atPath: path) else { throw DiskError.notFound(name) }
        // Our own overlay: read its header directly (the inspector rightly refuses images with backing files).
        guard let fh = FileHandle(forReadingAtPath: path) else { throw DiskError.io("cannot open '\(path)'") }
        defer { try? fh.close() }
        let h = [UInt8](fh.readData(ofLength: 4096))
        guard h.count >= 72, h[0..<4] == [0x51, 0x46, 0x49, 0xfb] else { throw DiskError.io("'\(path)' is not a qcow2 overlay") }
        func be(_ at: Int, _ n: Int) -> UInt64 { h[at..<(at + n)].reduce(0) { $0 << 8 | UInt64($1) } }
        let off = Int(be(8, 8)), len = Int(be(16, 4))
        let parent = off > 0 && off + len <= h.count ? String(decoding: h[off..<(off + len)], as: UTF8.self) : nil
        let imageID = parent.map { String($0.split(separator: "/").last ?? "") }
        return DiskInfo(name: name, backend: "local", location: path, size: be(24, 8), parent: parent, imageID: imageID)
    }

    public func list() async throws -> [DiskInfo] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: instancesDir)) ?? []
        return entries.sorted().compactMap { e in
            let name = e + "_disk"
            guard (try? DiskService.validateName(name)) != nil else { return nil }
            return try? overlayInfo(name)
        }
    }

    public func get(_ name: String) async throws -> DiskInfo {
        try DiskService.validateName(name)
        return try overlayInfo(name)
    }

    public func remove(_ name: String) async throws {
        try DiskService.validateName(name)
        let path = diskPath(name)
        guard FileManager.default.fileExists(atPath: path) else { throw DiskError.notFound(name) }
        let info = try? overlayInfo(name)
        try FileManager.default.removeItem(atPath: String(path.dropLast(5)))
        if let base = info?.parent { utime(base, nil) }
    }

    public func flatten(_ name: String) async throws -> DiskInfo {
        try DiskService.validateName(name)
        throw DiskError.busy("flatten is an RBD operation; a local overlay is flattened with the instance stopped (qemu-img rebase -b '')")
    }

    /// Bases no overlay names, untouched (mtime) for `idleSeconds`.
    public func collectGarbage(idleSeconds: Double, images: Set<String>?) async throws -> [String] {
        let inUse = Set(try await list().compactMap(\.parent))
        var removed: [String] = []
        let now = Date()
        for e in (try? FileManager.default.contentsOfDirectory(atPath: baseDir)) ?? [] {
            if let images, !images.contains(e) { continue }
            let path = "\(baseDir)/\(e)"
            guard !inUse.contains(path), let attrs = try? FileManager.default.attributesOfItem(atPath: path),
                  let mtime = attrs[.modificationDate] as? Date, now.timeIntervalSince(mtime) >= idleSeconds else { continue }
            if (try? FileManager.default.removeItem(atPath: path)) != nil { removed.append(e) }
        }
        return removed
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
