import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Who is on the other end of a control-socket connection (SO_PEERCRED, and SO_PEERGROUPS for the supplementary
/// groups), as the kernel recorded it at connect time.
public struct Peer: Sendable, Equatable, CustomStringConvertible {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public var groups: [UInt32]

    public init(uid: UInt32, gid: UInt32, pid: Int32 = 0, groups: [UInt32] = []) {
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.groups = groups
    }

    public var description: String { "uid \(uid) gid \(gid) pid \(pid)" }
}

/// Who may talk to the control socket: root, the agent's own user, the configured uids, and members of the
/// configured groups, primary or supplementary.
public struct PeerPolicy: Sendable {
    public var allowedUIDs: Set<UInt32>
    public var allowedGIDs: Set<UInt32>
    public init(allowedUIDs: [UInt32], allowedGIDs: [UInt32]) {
        self.allowedUIDs = Set(allowedUIDs).union([0, getuid()])
        self.allowedGIDs = Set(allowedGIDs)
    }

    public func allows(_ peer: Peer) -> Bool {
        allowedUIDs.contains(peer.uid) || allowedGIDs.contains(peer.gid) || peer.groups.contains { allowedGIDs.contains($0) }
    }

    public func allows(uid: UInt32, gid: UInt32) -> Bool { allows(Peer(uid: uid, gid: gid)) }
}

/// Open connections per peer uid, with a cap: a local user cannot hold the agent's descriptors.
public final class ConnectionLimiter: Sendable {
    let cap: Int
    private let open = Mutex<[UInt32: Int]>([:])
    private let refusals = Mutex<[UInt32: Int]>([:])

    public init(cap: Int) { self.cap = cap }

    /// Counts a new connection of `uid`; false (and nothing counted) when the uid is at its cap.
    func admit(_ uid: UInt32) -> Bool {
        open.withLock { o in
            guard o[uid, default: 0] < cap else { return false }
            o[uid, default: 0] += 1
            return true
        }
    }

    func release(_ uid: UInt32) {
        open.withLock { o in
            if let n = o[uid] { o[uid] = n > 1 ? n - 1 : nil }
        }
    }

    public func openConnections(_ uid: UInt32) -> Int { open.withLock { $0[uid] ?? 0 } }

    /// Whether to log this refusal: the first ten per uid, then one in a thousand.
    func shouldLog(_ uid: UInt32) -> Bool {
        refusals.withLock { r in
            r[uid, default: 0] += 1
            let n = r[uid]!
            return n <= 10 || n % 1000 == 0
        }
    }
}

/// The control socket's door, in front of HTTP: each new connection's peer is read from the kernel before a byte
/// of HTTP is parsed. A uid at its connection cap is answered 503 and closed at once; a peer the policy does not
/// allow is answered 403 (at its first bytes, or after a second of silence) and closed; everyone else gets the
/// HTTP/1.1 channel, whose idle timeout closes connections that send nothing (a response in progress, such as an
/// event stream, is never idle).
///
/// Setup never fails: a failed child-channel setup reaches the server's accept loop as an error and ends it.
struct GuardedHTTPChannel: ServerChildChannel {
    enum Value: ServerChildChannelValue {
        case served(HTTP1Channel.Value)
        case refused(any Channel)

        var channel: any Channel {
            switch self {
            case .served(let v): return v.channel
            case .refused(let c): return c
            }
        }
    }

    let http: HTTP1Channel
    let policy: PeerPolicy
    let limiter: ConnectionLimiter
    let logger: Logger

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        // The uid first: a connection over the cap costs one getsockopt and is gone (a flood must drain fast,
        // since an allowed client's connection waits behind it in the accept queue).
        Self.credentials(of: channel).flatMap { cred -> EventLoopFuture<Value> in
            guard let cred else {
                return refuse(channel, status: 403, message: "cannot read the peer's credentials", waitForRequest: false)
            }
            guard limiter.admit(cred.uid) else {
                if limiter.shouldLog(cred.uid) {
                    self.logger.warning("refused a connection over the per-uid cap", metadata: ["uid": "\(cred.uid)", "pid": "\(cred.pid)", "cap": "\(limiter.cap)"])
                }
                // The 503 goes straight to the socket, and the connection is closed: nothing else is set up.
                channel.writeAndFlush(Self.overCap).whenComplete { _ in channel.close(promise: nil) }
                return channel.eventLoop.makeSucceededFuture(.refused(channel))
            }
            channel.closeFuture.whenComplete { _ in limiter.release(cred.uid) }
            return Self.peer(cred, of: channel).flatMap { peer -> EventLoopFuture<Value> in
                guard policy.allows(peer) else {
                    if limiter.shouldLog(peer.uid) {
                        self.logger.warning("refused a control-socket peer", metadata: ["peer": "\(peer)", "groups": "\(peer.groups)"])
                    }
                    return refuse(channel, status: 403,
                                  message: "uid \(peer.uid) / gid \(peer.gid) is not allowed on this socket ([agent] allowed_uids, allowed_gids)",
                                  waitForRequest: true)
                }
                return http.setup(channel: channel, logger: logger).map { .served($0) }
            }
        }
    }

    func handle(value: Value, logger: Logger) async {
        if case .served(let v) = value { await http.handle(value: v, logger: logger) }
    }

    /// Answers with `status` and closes; with `waitForRequest`, after the peer's first bytes (so a client that
    /// sends its request as it connects reads the answer) or a second of silence.
    private func refuse(_ channel: any Channel, status: Int, message: String, waitForRequest: Bool) -> EventLoopFuture<Value> {
        let handler = RefusingHandler(response: Self.response(status: status, message: message))
        do {
            try channel.pipeline.syncOperations.addHandler(handler)
        } catch {
            channel.close(promise: nil)
            return channel.eventLoop.makeSucceededFuture(.refused(channel))
        }
        if !waitForRequest { handler.answer(channel) }
        return channel.eventLoop.makeSucceededFuture(.refused(channel))
    }

    static let overCap = response(status: 503, message: "this uid has too many connections open ([agent] max_connections_per_uid)")

    static func response(status: Int, message: String) -> ByteBuffer {
        let reason = status == 403 ? "Forbidden" : "Service Unavailable"
        let type = status == 403 ? HTTPErrors.ErrorType.forbidden : .tooManyConnections
        let body = (try? JSONSerialization.data(withJSONObject: ["error": ["code": status, "type": type.rawValue, "message": message]],
                                                options: [.sortedKeys])) ?? Data()
        let head = "HTTP/1.1 \(status) \(reason)\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
        var buffer = ByteBuffer(string: head)
        buffer.writeBytes(body)
        return buffer
    }

    /// The peer's uid, gid and pid (SO_PEERCRED); nil when the kernel does not say.
    static func credentials(of channel: any Channel) -> EventLoopFuture<ucred?> {
        guard let provider = channel as? SocketOptionProvider else { return channel.eventLoop.makeSucceededFuture(nil) }
        let cred: EventLoopFuture<ucred> = provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SO_PEERCRED)
        return cred.map { Optional($0) }.flatMapError { _ in channel.eventLoop.makeSucceededFuture(nil) }
    }

    /// The peer with its supplementary groups: SO_PEERGROUPS (Linux 4.13), the groups at connect time, sorted.
    static func peer(_ c: ucred, of channel: any Channel) -> EventLoopFuture<Peer> {
        let plain = Peer(uid: c.uid, gid: c.gid, pid: c.pid)
        guard let provider = channel as? SocketOptionProvider else { return channel.eventLoop.makeSucceededFuture(plain) }
        let groups: EventLoopFuture<PeerGroups> = provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET),
                                                                              name: SocketOptionName(59))
        return groups.map { Peer(uid: c.uid, gid: c.gid, pid: c.pid, groups: $0.list(primary: c.gid)) }
            // More groups than fit (ERANGE), or an old kernel: the primary group only.
            .flatMapError { _ in channel.eventLoop.makeSucceededFuture(plain) }
    }
}

/// Room for 1024 supplementary groups (NGROUPS_MAX is 65536; more than 1024 fall back to the primary group).
struct PeerGroups: Sendable {
    var gids: InlineArray<1024, UInt32>

    /// The groups, in the kernel's ascending order. A 0 can only come first: it is root's group when more groups
    /// follow, and padding (or, ambiguously, root's group alone: then not counted) when none do.
    func list(primary: UInt32) -> [UInt32] {
        var out: [UInt32] = []
        var i = 0
        if gids[0] == 0 {
            guard gids[1] != 0 else { return [] }
            out.append(0)
            i = 1
        }
        while i < 1024 && gids[i] != 0 {
            out.append(gids[i])
            i += 1
        }
        return out
    }
}

extension ucred: @retroactive @unchecked Sendable {}

/// Answers a refused connection once and closes it: at its first bytes, or after a second.
final class RefusingHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let response: ByteBuffer
    private var answered = false

    init(response: ByteBuffer) { self.response = response }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        context.eventLoop.scheduleTask(in: .seconds(1)) { [self] in answer(channel) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        answer(context.channel)
    }

    func answer(_ channel: any Channel) {
        guard !answered else { return }
        answered = true
        channel.writeAndFlush(response).whenComplete { _ in channel.close(promise: nil) }
    }
}
