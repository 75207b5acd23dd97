import AsyncHTTPClient
import Cache
import Disks
import RBD
import Dispatch
import Foundation
import Glance
import Hummingbird
import HummingbirdCore
import Logging
import SystemIO
import NIOCore
import ServiceLifecycle
#if canImport(Glibc)
import Glibc
#endif

/// `imgconv agent`: the cache, the prefetch loop and the control API, until SIGTERM or SIGINT.
public enum AgentRunner {
    /// `readTimeout`: seconds a response may send nothing before the request fails (and a download resumes).
    public static func makeHTTPClient(readTimeout: Double = 120) -> HTTPClient {
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: .seconds(10), read: .milliseconds(Int64(readTimeout * 1000)))
        configuration.decompression = .disabled
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    public static func makeSource(_ config: AgentConfig, http: HTTPClient, logger: Logger) -> GlanceSource {
        let g = config.glance
        var auth: KeystoneAuth?
        switch g.authType {
        case .password:
            auth = KeystoneAuth(authURL: g.authURL!, credentials: .password(
                username: g.username!, password: g.password!, userDomain: g.userDomainName, project: g.projectName!,
                projectDomain: g.projectDomainName), http: http)
        case .v3applicationcredential:
            auth = KeystoneAuth(authURL: g.authURL!, credentials: .applicationCredential(
                id: g.applicationCredentialID!, secret: g.applicationCredentialSecret!), http: http)
        case .none:
            auth = nil
        }
        let client = GlanceClient(http: http, endpoint: GlanceEndpoint(apiServers: g.apiServers, auth: auth,
                                                                       region: g.regionName, interface: g.interface,
                                                                       preferStores: g.preferStores))
        return GlanceSource(client: client, verify: g.verifyHash, retry: RetryPolicy(attempts: g.retries),
                            bytesPerSecond: config.prefetch.bandwidthLimit)
    }

    public static func cacheConfig(_ config: AgentConfig) -> CacheConfig {
        CacheConfig(directory: config.cacheDirectory, indexPath: config.agent.stateDir + "/index.sqlite",
                    maxSize: config.cache.maxSize, minFree: config.cache.minFree, layout: config.cache.layout,
                    forceRaw: config.cache.forceRaw)
    }

    /// `[rbd]` present: RBD clones. Absent: qcow2 overlays in the instances directory.
    public static func makeDiskBackend(_ config: AgentConfig, logger: Logger) -> any DiskBackend {
        if let r = config.rbd {
            var s = RBDSettings(ceph: CephConfiguration(confPath: r.cephConf, user: r.user, keyring: r.keyring, timeout: r.connectTimeout))
            s.pool = r.pool
            s.leaseSeconds = Int(r.lease.rounded(.up))
            s.baseWait = Int(r.baseWait)
            s.copyToStore = config.glance.copyToStore
            s.copyTimeout = config.glance.copyTimeout
            s.cinder = config.cinder.enabled
            s.cinderEndpoint = config.cinder.endpointOverride
            s.cinderTimeout = Int64(config.cinder.timeout.rounded(.up))
            s.cinderStores = config.cinder.stores
            return RBDBackend(settings: s, logger: logger)
        }
        return LocalBackend(instancesDir: config.instancesDirectory, stateDir: config.agent.stateDir, logger: logger)
    }

    /// How long SIGTERM waits for running work to stop before the agent exits anyway.
    static let shutdownDeadline = 4.5

    public static func run(config: AgentConfig, logger: Logger) async throws {
        MallocTuning.forAgent()
        let http = makeHTTPClient(readTimeout: config.glance.readTimeout)
        let source = makeSource(config, http: http, logger: logger)
        let socketPath = config.agent.socketPath
        let cache: ImageCache
        let bindPath: String
        do {
            cache = try await ImageCache.open(config: cacheConfig(config), source: source, logger: logger)
            bindPath = try await offload { try prepareSocketPath(socketPath) }
        } catch {
            try? await http.shutdown()
            throw error
        }
        let policy = PeerPolicy(allowedUIDs: config.agent.allowedUIDs, allowedGIDs: config.agent.allowedGIDs)
        let limiter = ConnectionLimiter(cap: config.agent.maxConnectionsPerUID)
        let disks = DiskService(backend: makeDiskBackend(config, logger: logger), source: source, cache: cache,
                                maxSize: config.disks.maxSize, logger: logger)
        let router = ControlAPI.router(cache: cache, disks: disks, gcIdle: config.disks.gcIdle)
        let groupID = try config.agent.socketGroup.map(Self.groupID)
        let mode = config.agent.socketMode
        let idle = config.agent.idleTimeout
        // The socket is bound inside a private directory (0700: nobody can connect while its mode is not yet the
        // configured one), given its mode and group, and only then renamed into place. The umask is never touched.
        let server = HTTPServerBuilder { responder in
            GuardedHTTPChannel(http: HTTP1Channel(responder: responder, configuration: .init(idleTimeout: .milliseconds(Int64(idle * 1000)))),
                               policy: policy, limiter: limiter, logger: logger)
        }
        let app = Application(
            router: router,
            server: server,
            configuration: .init(address: .unixDomainSocket(path: bindPath), serverName: "imgconv-agent"),
            onServerRunning: { _ in
                do {
                    try await offload { try publishSocket(bindPath, at: socketPath, mode: mode, group: groupID) }
                    logger.notice("control API listening", metadata: ["socket": "\(socketPath)", "mode": "\(String(mode, radix: 8))"])
                } catch {
                    logger.critical("cannot publish the control socket", metadata: ["error": "\(error)"])
                }
            },
            logger: logger
        )
        let group = ServiceGroup(configuration: .init(services: [.init(service: app)], gracefulShutdownSignals: [],
                                                      cancellationSignals: [], logger: logger))
        let prefetcher = Prefetcher(cache: cache, client: source.client, config: config.prefetch, logger: logger)
        let background = Task {
            await withTaskGroup(of: Void.self) { g in
                g.addTask { await prefetcher.run() }
                if config.agent.memoryTrimIdle > 0 {
                    g.addTask { await IdleTrim.run(idleSeconds: config.agent.memoryTrimIdle, pageOutCode: config.agent.memoryTrimCode, logger: logger) }
                }
                if config.disks.gcInterval > 0 && config.disks.gcIdle > 0 {
                    g.addTask {
                        while !Task.isCancelled {
                            try? await Task.sleep(for: .seconds(config.disks.gcInterval))
                            if Task.isCancelled { break }
                            do {
                                let removed = try await disks.backend.collectGarbage(idleSeconds: config.disks.gcIdle)
                                if !removed.isEmpty { logger.notice("removed idle bases", metadata: ["bases": "\(removed)"]) }
                            } catch {
                                logger.warning("base garbage collection failed", metadata: ["error": "\(error)"])
                            }
                        }
                    }
                }
                if config.cache.checkInterval > 0 {
                    g.addTask {
                        while !Task.isCancelled {
                            try? await Task.sleep(for: .seconds(config.cache.checkInterval))
                            if Task.isCancelled { break }
                            await cache.checkFilesAndRestorePinned()
                        }
                    }
                }
                if config.cache.scrubInterval > 0 {
                    g.addTask {
                        while !Task.isCancelled {
                            try? await Task.sleep(for: .seconds(config.cache.scrubInterval))
                            if Task.isCancelled { break }
                            _ = try? await cache.scrub()
                        }
                    }
                }
            }
        }
        // SIGTERM / SIGINT: stop taking work, cancel every job (each removes what it half made), end event streams,
        // stop the server. Whatever has not stopped after `shutdownDeadline` is left: the agent exits anyway,
        // removing its temporary files on the way out (start-up removes any it could not).
        // A parent (a test runner, a shell script) may have started us with these blocked.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        sigaddset(&unblock, SIGTERM)
        sigaddset(&unblock, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        let cacheDirectory = cache.config.directory
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                logger.notice("shutting down", metadata: ["signal": "\(sig)"])
                DispatchQueue.global().asyncAfter(deadline: .now() + shutdownDeadline) {
                    logger.error("work still running after the shutdown deadline; exiting anyway", metadata: ["seconds": "\(shutdownDeadline)"])
                    removeTemporaryFiles(cacheDirectory)
                    unlink(socketPath)
                    fflush(nil)
                    _exit(0)
                }
                background.cancel()
                Task {
                    await group.triggerGracefulShutdown()
                    async let d: Void = disks.shutdown()
                    async let c: Void = cache.shutdown()
                    _ = await (d, c)
                }
            }
            s.resume()
            sources.append(s)
        }
        defer { sources.forEach { $0.cancel() } }
        do {
            try await group.run()
        } catch {
            logger.error("control API stopped", metadata: ["error": "\(error)"])
        }
        background.cancel()
        await disks.shutdown()
        await cache.shutdown()
        await cleanup { unlink(socketPath) }
        try? await http.shutdown()
        logger.notice("agent stopped")
    }

    /// Temporary files of unfinished writes in the cache directory (the last resort of a forced exit).
    static func removeTemporaryFiles(_ directory: String) {
        for name in FileSystem.list(directory) where name.hasPrefix(".") && name.contains(".imgconv-") && !name.hasPrefix(".imgconv-index") {
            unlink(directory + "/" + name)
        }
        for name in FileSystem.list(directory) where name.hasPrefix("stream-") {
            unlink(directory + "/" + name)
        }
    }

    /// Gives the bound socket its mode and group, renames it to `path` and removes the private directory.
    static func publishSocket(_ bound: String, at path: String, mode: UInt16, group: UInt32?) throws {
        if let gid = group, chown(bound, UInt32.max, gid) != 0 { throw FileError("chgrp", path: bound, errno: errno) }
        if chmod(bound, mode_t(mode)) != 0 { throw FileError("chmod", path: bound, errno: errno) }
        if rename(bound, path) != 0 { throw FileError("rename to '\(path)'", path: bound, errno: errno) }
        if let slash = bound.lastIndex(of: "/") { rmdir(String(bound[..<slash])) }
    }

    /// Makes the socket's directory, removes a stale socket (refusing if another agent answers on it), and makes
    /// the private directory (0700) the socket is first bound in; returns the path to bind.
    static func prepareSocketPath(_ path: String) throws -> String {
        guard let slash = path.lastIndex(of: "/") else { throw ConfigError("[agent] socket_path must be absolute") }
        let dir = String(path[..<slash])
        if !dir.isEmpty { try FileSystem.makeDirectory(dir, mode: 0o755) }
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw ConfigError("[agent] socket_path '\(path)' exists and is not a socket; remove it or choose another path")
            }
            if socketAnswers(path) { throw ConfigError("another agent is listening on '\(path)'") }
            unlink(path)
        }
        let privateDir = "\(dir)/.imgconv-bind-\(getpid())"
        for name in FileSystem.list(privateDir) { unlink("\(privateDir)/\(name)") }
        rmdir(privateDir)
        if mkdir(privateDir, 0o700) != 0 { throw FileError("mkdir", path: privateDir, errno: errno) }
        if chmod(privateDir, 0o700) != 0 { throw FileError("chmod", path: privateDir, errno: errno) }
        return privateDir + "/s"
    }

    static func socketAnswers(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, __CONST_SOCKADDR_ARG(__sockaddr__: $0), socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return r == 0
    }

    static func groupID(_ name: String) throws -> UInt32 {
        if let n = UInt32(name) { return n }
        guard let g = getgrnam(name) else { throw ConfigError("[agent] socket_group: no group named '\(name)'") }
        return g.pointee.gr_gid
    }
}

/// Pulls the configured images before anyone asks: by id, by a property set to true, and by tag, every interval.
struct Prefetcher: Sendable {
    let cache: ImageCache
    let client: GlanceClient
    let config: AgentConfig.PrefetchSection
    let logger: Logger

    func run() async {
        guard !config.images.isEmpty || config.property != nil || config.tag != nil else { return }
        while !Task.isCancelled {
            await once()
            try? await Task.sleep(for: .seconds(config.interval))
        }
    }

    func wanted() async throws -> [String] {
        var ids = config.images
        if let p = config.property {
            ids += try await client.list(filters: [(p, "true"), ("status", "active")]).compactMap { ImageID.normalized($0.id) }
        }
        if let t = config.tag {
            ids += try await client.list(filters: [("tag", t), ("status", "active")]).compactMap { ImageID.normalized($0.id) }
        }
        var seen = Set<String>()
        return ids.filter { seen.insert($0).inserted }
    }

    func once() async {
        let ids: [String]
        do {
            ids = try await wanted()
        } catch {
            logger.error("prefetch: cannot list images", metadata: ["error": "\(error)"])
            return
        }
        await withTaskGroup(of: Void.self) { g in
            var running = 0
            for id in ids {
                if Task.isCancelled { break }
                if running >= config.concurrency {
                    await g.next()
                    running -= 1
                }
                running += 1
                g.addTask {
                    do {
                        _ = try await cache.fetch(id, throttled: true)
                    } catch {
                        logger.error("prefetch failed", metadata: ["image": "\(id)", "error": "\(error)"])
                    }
                }
            }
        }
    }
}
